"""The README's headline table: quality, size and speed of potq's best rows beside uniform and llama.cpp.

    .venv/bin/python benchmarks/headline.py && .venv/bin/python benchmarks/readme_tables.py

Reads what the measuring scripts stored — perplexities and sizes from
docs/results/smollm2-135m-runs.json (benchmarks/ppl_table.py), decoding speeds from
docs/results/speed.json (`potq bench`, every speed from one run on one machine) — and measures
nothing itself.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
# (row in the perplexity store, its label, the decoding variant of speed.json that packs it the same way)
# A row missing from the store (not measured yet) is left out of the table.
ROWS = [
    ("float", "float (Q4_1-expanded)", "float32"),
    ("llama.cpp:Q4_0", "llama.cpp Q4_0", "peer:Q4_0"),
    ("llama.cpp:Q3_K_M", "llama.cpp Q3_K_M", "peer:Q3_K_M"),
    ("uniform:4:blockap+e2e", "uniform 4-bit Block-AP + E2E, G128", None),
    ("apot:4:blockap+e2e:64", "APoT 4-bit Block-AP + E2E, G64", "apot4"),
    ("pot:4:blockap+e2e:64", "PoT 4-bit Block-AP + E2E, G64", "pot4"),
    ("uniform:3:blockap+e2e", "uniform 3-bit Block-AP + E2E, G128", None),
    ("apot:3:blockap+e2e:64", "APoT 3-bit Block-AP + E2E, G64", "apot3"),
    ("pot:3:blockap+e2e:64", "PoT 3-bit Block-AP + E2E, G64", "pot3"),
    ("uniform:2:blockap+e2e", "uniform 2-bit Block-AP + E2E, G128", None),
    ("apot:2:blockap+e2e:64", "APoT 2-bit (PoT ±a, ±a/4) Block-AP + E2E, G64", "apot2"),
    ("pot:2:blockap+e2e:64", "PoT 2-bit Block-AP + E2E, G64", "pot2"),
]


# (what a user wants, the row in the perplexity store, the options that make it)
RECIPES = [
    ("APoT (sums of two powers of two), smallest error at about 4.25 bits", "apot:4:blockap+e2e:64",
     "--format apot --bits 4 --group-size 64 --method blockap,e2e"),
    ("APoT, smallest error at about 3.25 bits", "apot:3:blockap+e2e:64",
     "--format apot --bits 3 --group-size 64 --method blockap,e2e"),
    ("smallest error at about 2.25 bits (PoT: ±a, ±a/4)", "apot:2:blockap+e2e:64",
     "--format apot --bits 2 --group-size 64 --method blockap,e2e"),
    ("PoT, smallest error at about 4.25 bits", "pot:4:blockap+e2e:64",
     "--format pot --bits 4 --group-size 64 --method blockap,e2e"),
    ("PoT 4-bit, scales tuned end to end", "pot:4:e2e:64", "--format pot --bits 4 --group-size 64 --method e2e"),
    ("PoT, smallest error at about 3.25 bits", "pot:3:blockap+e2e:64",
     "--format pot --bits 3 --group-size 64 --method blockap,e2e"),
    ("PoT 4-bit, fast", "pot:4:grid:64,objective=act",
     "--format pot --bits 4 --group-size 64 --method grid --objective act"),
    ("uniform, best 4-bit", "uniform:4:blockap+e2e", "--format uniform --bits 4 --method blockap,e2e"),
    ("uniform, best 3-bit", "uniform:3:blockap+e2e", "--format uniform --bits 3 --method blockap,e2e"),
    ("uniform, best 2-bit", "uniform:2:blockap+e2e", "--format uniform --bits 2 --method blockap,e2e"),
    ("a quick baseline", "uniform:4", "--format uniform --bits 4 --method rtn"),
]


def recipes(runs: dict) -> list[str]:
    """The recipe table of the README's "quantize your own model": each command with what it cost
    and gave on SmolLM2-135M."""
    lines = ["# Recipes: what each command costs and gives on SmolLM2-135M", "",
             "`.venv/bin/python benchmarks/headline.py` (from the store of `benchmarks/ppl_table.py`)", "",
             "| you want | `potq quantize MODEL -o OUT` with | quantize time | bits/weight | WikiText-2 ppl |",
             "| --- | --- | --- | --- | --- |"]
    machines = set()
    for goal, row, options in RECIPES:
        if row not in runs:
            continue
        r = runs[row]
        if r.get("machine"):
            machines.add(r["machine"])
        minutes = r["quantize_seconds"] / 60
        took = (f"{minutes:.0f} min" if minutes >= 1 else f"{r['quantize_seconds']:.0f} s") + \
            ("*" if r.get("shared_machine") else "")
        lines.append(f"| {goal} | `{options}` | {took} | {r['bits_per_weight']:.3f} | {r['wikitext2']['ppl']:.2f} |")
    lines += ["", f"Note: times are wall time on 2 cores ({'; '.join(sorted(machines))}), * where other work "
              "shared the cores (longer than the method's own); perplexity on the full "
              "WikiText-2 test set at context 2048 (`potq eval OUT --max-windows 8` gives a quick estimate)."]
    return lines


def main() -> None:
    runs = json.loads((RESULTS / "smollm2-135m-runs.json").read_text())
    speed = json.loads((RESULTS / "speed.json").read_text())
    lines = ["# Headline: SmolLM2-135M", "",
             "`.venv/bin/python benchmarks/headline.py` (from the stores of `benchmarks/ppl_table.py` and "
             "`potq bench`)", "",
             "| model | bits/weight (incl. scales) | file MiB | WikiText-2 ppl | decode tok/s "
             f"| prefill of {speed['decode']['pot3']['prefill_tokens']} tok/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row, label, variant in ROWS:
        if row not in runs:
            continue
        r = runs[row]
        mib = f"{r['file_bytes'] / 2**20:.1f}" if r.get("file_bytes") else "–"
        timed = (None if variant is None else speed["peer"].get(variant[5:]) if variant.startswith("peer:")
                 else speed["decode"].get(variant))  # None: not in the last speed run
        tok_s = "–" if timed is None else f"{timed['tokens_per_s']:.1f}"
        prefill = "–" if timed is None else f"{timed['prefill_tokens_per_s']:.0f}"
        mark = "†" if r["wikitext2"].get("dtype") == "bf16" else ""
        lines.append(f"| {label} | {r['bits_per_weight']:.3f} | {mib} | {r['wikitext2']['ppl']:.2f}{mark} | {tok_s} "
                     f"| {prefill} |")
    lines += ["", f"Note: perplexity on the full WikiText-2 test set at context 2048, in fp32 († in bf16 autocast). "
              f"Decoding: {speed['new_tokens']} greedy "
              f"tokens after a {speed['prompt_tokens']}-token prompt, batch 1, {speed['threads']} threads on "
              f"{speed['cpu']}, all rows in one run, potq's rows through its native decoder (one C++ call a "
              "token, PoT and APoT layers on 8-bit activations); a PoT or APoT row's speed is that of its format "
              "and bits at G128 (the packing the speed run measured; – where that run had none); uniform rows were not timed (potq computes them from float weights, "
              "at about float speed). potq's file sizes are of folders that kept the embedding/output head "
              "in float32 (llama.cpp's quantize it); potq now stores a table the GGUF held as Q8_0 as the same "
              "8-bit codes, losslessly, so its files are smaller by the table's float32-to-8.5-bit difference "
              "and its perplexity unchanged."]
    (RESULTS / "headline.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "recipes.md").write_text("\n".join(recipes(runs)) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
