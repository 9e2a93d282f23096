export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh; set +e +u
t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/pip.log 2>&1 || tail -20 $OUT/pip.log
echo "install $(( $(date +%s) - t0 )) s"
cd /tmp
python3 $OLDPWD/bench/tune/decode_profile.py 1 > $OUT/prof_b1.txt 2>&1; cat $OUT/prof_b1.txt
ncu --clock-control none -k regex:"cache_append|decode_attention" --launch-skip 20 --launch-count 2 --set full --import-source yes -o $OUT/b1 python3 $OLDPWD/bench/tune/decode_profile.py 1 > $OUT/ncu_run.txt 2>&1; tail -3 $OUT/ncu_run.txt
ncu --import $OUT/b1.ncu-rep --page details > $OUT/details.txt 2>&1
ncu --import $OUT/b1.ncu-rep --page source --print-source cuda --csv > $OUT/source.csv 2>&1
grep -E "Duration|Registers Per|Achieved Occ|Memory Throughput|Compute \(SM\) Thr|Issue Slots Busy|cache_append|decode_attention|Stall|Block Size|Grid Size" $OUT/details.txt | head -60
ls -la $OUT
