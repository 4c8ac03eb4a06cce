#!/usr/bin/env bash
# session 16 call 3: why a launch reading vitboost's bytecode cache (~/.cache) is ~2 s slower than one reading an
# installed-like cache (/tmp/pyc): the folder's filesystem, or the cache itself
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
R=$OUT/call3.txt
{ date; which python; python -c "import sys, sysconfig, torch; print(sys.version); print(sysconfig.get_paths()['stdlib'], torch.__file__)"
  S=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])"); echo "stdlib pyc: $(find $S -name '*.pyc' | wc -l), py: $(find $S -name '*.py' | wc -l)"
  df -T /tmp /root /work/main | cat; mount | grep -E " on (/|/tmp|/root) " ; } >> $R 2>&1
AB=results/session12/ab_runner.sh
arm() { # NAME: one ViT-B 3-epoch run under that arm's bytecode setting
  case $1 in
    vb_*) bash $AB $PWD $1 ;;
    vbtmp_*) VITBOOST_BYTECODE=/tmp/vbc bash $AB $PWD $1 ;;
    installed_*) env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=/tmp/pyc bash $AB $PWD $1 ;;
  esac >> $OUT/ab.jsonl 2>&1; }
for a in vb vbtmp installed; do arm ${a}_0; done
for i in 1 2 3; do
  for a in vb vbtmp installed; do
    touch /tmp/mark; sleep 0.2
    if [ $i = 1 ]; then PYTHONPROFILEIMPORTTIME=1 arm ${a}_$i; else arm ${a}_$i; fi
    echo "${a}_$i pyc written: $(find ~/.cache/vitboost/bytecode /tmp/vbc /tmp/pyc -newer /tmp/mark -name '*.pyc' 2>/dev/null | wc -l)" >> $R
  done
done
for i in 0 1 2 3; do for a in vb vbtmp installed; do
  echo "${a}_$i $(python -c "import json;d=json.load(open('/tmp/e2e/${a}_$i/summary.json'));print(d['launch_marks_s'], d['timings_s']['launch'])")" >> $R
done; done
mkdir -p $OUT/logs; for a in vb vbtmp installed; do grep "import time" /tmp/e2e/${a}_1.log > $OUT/logs/${a}_1.importtime; done
date >> $R
