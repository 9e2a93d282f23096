#!/usr/bin/env bash
python3 bench/tune/decode_variants.py 1 64 2>&1 | grep -v -i warn
DENSE_PEERS=1 python3 bench/tune/decode_variants.py 1 64 2>&1 | grep -v -i warn
python3 bench/tune/decode_variants.py 1 2>&1 | grep -v -i warn
