"""Print the results of a GPU session (the JSON files of em_step.py / eval_throughput.py /
check_decode.py in one folder) as the Markdown rows benchmarks/RESULTS.md takes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def is_project(key: str) -> bool:
    """Whether an em_step.py result key is a project part: ``project[@backend][+option...]``."""
    return key.split("@")[0].split("+")[0] == "project"


def _f(x: Any, d: int = 2) -> str:
    return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))


def summarize(folder: Path) -> str:
    lines: list[str] = []
    files = sorted(folder.glob("*.json"))
    env = next((json.loads(f.read_text()).get("env") for f in files), None)
    if env:
        lines.append(f"Machine: {env.get('gpu', env.get('device'))}, {env.get('date')}, torch {env.get('torch')}, "
                     f"transformers {env.get('transformers')}, python {env.get('python')}")
    for f in files:
        r = json.loads(f.read_text())
        if "checks" in r:
            bad = [k for k, c in r["checks"].items() if not c["ok"]]
            lines.append(f"\ndecoder checks ({f.name}): {len(r['checks']) - len(bad)}/{len(r['checks'])} pass"
                         + (f"; FAILED: {bad}" if bad else ""))
    em = [{**json.loads(f.read_text()), "run": f.stem} for f in files
          if json.loads(f.read_text()).get("benchmark") == "em_step"]
    if em:
        lines += ["", "| run | variant | sampling s | loss fwd+bwd s | optimizer s | step s | peak GiB | settings |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in em:
            for key in ["reference"] + [k for k in r if is_project(k)]:
                p = r.get(key)
                if not p:
                    continue
                if "error" in p:
                    lines.append(f"| {r['run']} | {key} | failed: {p['error'][:60]} | | | | | |")
                    continue
                if key == "reference":
                    name, settings = "reference style, EXTRAPOLATED", p["label"]
                else:
                    name = "em-sweep em_step, measured"
                    settings = (f"{key}: {p['backend']}, {p['optimizer']}, micro {p['micro_batch']}, ckpt "
                                f"{bool(p['gradient_checkpointing'])}, compiled loss {p.get('compile_loss', False)}, "
                                f"shared prompt {p.get('share_prompt', False)} (active {p.get('share_prompt_active', False)}), "
                                f"first step {p['first_step_s']} s")
                peak = p.get("peak_gib", p.get("peak_gib_loss_micro"))
                lines.append(f"| {r['run']} | {name} | {_f(p['sample_s'])} | {_f(p['loss_s'])} | "
                             f"{_f(p['optim_s'], 3)} | {_f(p['step_s'])} | {_f(peak)} | {settings} |")
            if "ratio_reference_over_project" in r:
                lines.append(f"| {r['run']} | ratio reference / em-sweep | | | | {r['ratio_reference_over_project']}x | | "
                             f"against {r.get('ratio_project_part', 'project')} |")
    ev = [{**json.loads(f.read_text()), "run": f.stem} for f in files
          if json.loads(f.read_text()).get("benchmark") == "eval_throughput"]
    if ev:
        lines += ["", "| run | path | batch | generated tok/s (short ctx) | tok/s (long ctx) | "
                      "four-benchmark pass s, EXTRAPOLATED |", "| --- | --- | --- | --- | --- | --- |"]
        for r in ev:
            for k, p in r.items():
                if not (k.startswith("project_b") or k == "generate_b1") or not isinstance(p, dict):
                    continue
                name = f"em-sweep ({p.get('backend', '?')})" if k.startswith("project") else "model.generate"
                if "error" in p:
                    lines.append(f"| {r['run']} | {name} | | failed: {p['error'][:60]} | | |")
                    continue
                lines.append(f"| {r['run']} | {name} | {p['batch']} | {p['tokens_per_s']} | {p['tokens_per_s_long']} | "
                             f"{p['four_benchmarks']['seconds']} |")
    cb = [{**json.loads(f.read_text()), "run": f.stem} for f in files
          if json.loads(f.read_text()).get("benchmark") == "continuous_batching"]
    if cb:
        lines += ["", "| run | problems | mean / cap response tokens | static tok/s (backend, slot use) | "
                      "continuous tok/s (backend, slot use) | continuous / static |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in cb:
            w, st, co = r["workload"], r.get("static", {}), r.get("continuous", {})
            lines.append(f"| {r['run']} | {sum(w['problems'].values())} | {w['mean_response']} / {w['cap']} | "
                         f"{st.get('tokens_per_s', '-')} ({st.get('backend', '-')}, {st.get('slot_use', '-')}) | "
                         f"{co.get('tokens_per_s', '-')} ({co.get('backend', '-')}, {co.get('slot_use', '-')}) | "
                         f"{r.get('ratio_continuous_over_static', '-')}x |")
    for f in files:
        r = json.loads(f.read_text())
        if r.get("benchmark") == "parallel_runs":
            runs = [v for k, v in r.items() if k.startswith("n") and isinstance(v, dict)]
            lines.append(f"\nparallel_runs ({f.stem}, {r['shape']}): " + "; ".join(
                f"{v['processes']} process(es): median step s {v['median_step_s']}, {v.get('steps_per_s')} steps/s"
                + (f" ({v['throughput_ratio']}x one)" if "throughput_ratio" in v else "")
                + (" ERRORS" if "errors" in v else "") for v in runs))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
