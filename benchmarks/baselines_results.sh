#!/usr/bin/env bash
# The baselines the thesis compares against (issue 5), on SmolLM2-135M, G128, ctx 2048, full
# test sets: uniform RTN / GPTQ / AWQ / OmniQuant at 4, 3, 2 bits (thesis Table 3.1) and their
# PoT adaptations next to potq's twostep at 3 and 2 bits (Table 4.1). Resumable like
# benchmarks/twostep_results.sh (same store, docs/results/smollm2-135m-runs.json).
#
#   bash benchmarks/baselines_results.sh [DATASETS...]     (default: wikitext2)
source "$(dirname "$0")/table_setup.sh"

UNIFORM=(float)
for bits in 4 3 2; do
  for method in rtn gptq awq omniquant; do UNIFORM+=("uniform:$bits:$method"); done
done
# the peer (issue 5): llama.cpp's own quantizer on the same GGUF, evaluated by potq (needs potq[peer])
PEER=(llama.cpp:Q4_0 llama.cpp:Q3_K_M llama.cpp:Q2_K)
POT=(float)
for bits in 3 2; do
  for method in rtn awq gptq omniquant twostep; do POT+=("pot:$bits:$method"); done
done
# OMNI_POT on a shorter schedule than OmniQuant's own (potq's first default), with either gradient:
# only shown here (measured with `ppl_table.py --rows`); docs/results/lwc-settings.md says why it lost
SHORT=(pot:3:omniquant,epochs=10,lr=0.005,batch_size=4 pot:3:omniquant,grad=detach,epochs=10,lr=0.005,batch_size=4)
# twostep with λ/2‖Γ‖² in the loss, its first default (see benchmarks/twostep_results.sh)
COUPLED=(pot:3:twostep,decay=coupled pot:2:twostep,decay=coupled)
# GPTQ in the plain column order, its first default (act-order is the default since it won every
# row), with static groups alone, and at 4 bits on the thesis' calibration (128×2048) instead of the
# 2-core default (32×512): only shown here (measured with `ppl_table.py --rows`), to tell whether
# plain-order GPTQ trailing RTN at 4 bits comes from the calibration, the group scales or the order
GPTQ_PLAIN=(uniform:4:gptq,act_order=false uniform:3:gptq,act_order=false uniform:2:gptq,act_order=false
            uniform:4:gptq,act_order=false,static_groups=true uniform:3:gptq,act_order=false,static_groups=true
            uniform:4:gptq,calib_samples=128,calib_len=2048,act_order=false)
GPTQ_POT_PLAIN=(pot:3:gptq,act_order=false pot:2:gptq,act_order=false)
# AWQ without its clipping search at 2 bits, where the thesis' AWQ fails worst: only shown here, to
# tell whether the clipping search is what puts potq's 2-bit AWQ below GPTQ (measured with `ppl_table.py --rows`)
AWQ_NOCLIP=(uniform:2:awq,clip=false)

if [[ -z "${VIEWS_ONLY:-}" ]]; then
  if "$PY" -c "import llama_cpp" 2>/dev/null; then
    "$PY" "${TABLE[@]}" --rows "${PEER[@]}" --out "out/progress-peer-$TAG"
  fi
  "$PY" "${TABLE[@]}" --rows "${POT[@]}" "${UNIFORM[@]:1}" --out "out/progress-baselines-$TAG"
fi
"$PY" "${TABLE[@]}" --no-measure --rows "${UNIFORM[@]}" "${GPTQ_PLAIN[@]}" "${AWQ_NOCLIP[@]}" "${PEER[@]}" --out "docs/results/baselines-uniform-$TAG"
"$PY" "${TABLE[@]}" --no-measure --rows "${POT[@]}" "${GPTQ_POT_PLAIN[@]}" "${SHORT[@]}" "${COUPLED[@]}" --out "docs/results/baselines-pot-$TAG"
# the issue's docs/results/baselines.md: both views in one page (each keeps its own command)
{
  echo "# Baselines: uniform (thesis Table 3.1, with the llama.cpp peer) and PoT-adapted (Table 4.1)"
  echo
  echo "Written by \`bash benchmarks/baselines_results.sh ${DATASETS[*]}\` from the two views below."
  echo
  echo "## Uniform: RTN, GPTQ, AWQ, OmniQuant at 4, 3, 2 bits; llama.cpp's quantizer"
  tail -n +2 "docs/results/baselines-uniform-$TAG.md"
  echo
  echo "## PoT-adapted: AWQ_POT, GPTQ_POT, OMNI_POT and potq's twostep at 3 and 2 bits"
  tail -n +2 "docs/results/baselines-pot-$TAG.md"
} > docs/results/baselines.md.tmp
mv docs/results/baselines.md.tmp docs/results/baselines.md
