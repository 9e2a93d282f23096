#!/usr/bin/env bash
(cd /tmp && python3 -m pytest -q -x -p no:cacheprovider $OLDPWD/tests/python/test_sparsek_gpu.py 2>&1 | tail -2)
for S in 131072 32768 131072; do
  python3 bench/tune/sparsek_variants.py $S 2>&1 | tail -13 | grep -E "key_value|none|window|dense non|A/B"
done
