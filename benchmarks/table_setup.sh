# Shared set-up of the result scripts (sourced): repo root, python, data sets from the command
# line (default wikitext2), the ppl_table.py command on SmolLM2-135M, and a tag for file names.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
DATASETS=("${@:-wikitext2}")
TABLE=(benchmarks/ppl_table.py --model smollm2-135m --dataset "${DATASETS[@]}")
TAG=$(IFS=-; echo "${DATASETS[*]}")
