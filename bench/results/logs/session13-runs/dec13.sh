#!/usr/bin/env bash
# What the A/B runs in each build: the decode pieces' GPU time per call (B=1 and 64), twice.
python3 bench/tune/decode_variants.py 1 64 2>&1 | grep -v -i warn
python3 bench/tune/decode_variants.py 1 2>&1 | grep -v -i warn
