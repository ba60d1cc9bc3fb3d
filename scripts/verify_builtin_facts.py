"""Check that the embedded default model (SmolLM2-135M-Instruct) knows the built-in facts and locality probes.

A fact is *known* when the greedy continuation of its prompt starts with ``target_true`` OR the teacher-forced
argmax at the first target position is the first token of ``" " + target_true``. The same test is applied to each
fact's paraphrases (with ``target_true``), to its locality prompts (with their answers) and to the fixed locality
probe set (``editors/resources/locality_probes.json``).

Usage:
    python scripts/verify_builtin_facts.py [--device cpu] [--show-unknown] [--min-share 0.95] [--json out.json]

Prints one line per relation and the overall shares; exits 1 when the share of known facts (or of known probes)
is below ``--min-share`` (or ``--min-probe-share``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

from analysis.evaluation import greedy_continuations, starts_with_target, teacher_forced  # noqa: E402
from editors.data import builtin_probes, builtin_requests  # noqa: E402
from editors.models import load_model  # noqa: E402


def known(lm, prompts: list[str], targets: list[str], max_new_tokens: int = 6) -> list[tuple[bool, str]]:
    """(known?, greedy continuation) for each (prompt, target) pair, by the criterion in the module docstring."""
    if not prompts:
        return []
    texts = greedy_continuations(lm, prompts, max_new_tokens=max_new_tokens)
    tf = teacher_forced(lm, prompts, targets)
    return [(starts_with_target(text, target) or (bool(o.target_ids) and o.argmax_ids[0] == o.target_ids[0]), text)
            for text, target, o in zip(texts, targets, tf)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="device for the default model (default: cpu)")
    ap.add_argument("--max-new-tokens", type=int, default=6, help="greedy tokens generated per prompt")
    ap.add_argument("--show-unknown", action="store_true", help="list every prompt the model does not know")
    ap.add_argument("--min-share", type=float, default=0.95, help="required share of known facts")
    ap.add_argument("--min-probe-share", type=float, default=0.90, help="required share of known locality probes")
    ap.add_argument("--json", default=None, help="also write the per-item results to this JSON file")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.time()
    lm = load_model("default", device=args.device)
    facts = builtin_requests()
    probes = builtin_probes()

    # every (kind, index, prompt, target) checked, in one batched pass
    items: list[tuple[str, int, str, str]] = []
    for i, r in enumerate(facts):
        items.append(("prompt", i, r.prompt, r.target_true))
        items.extend(("rephrase", i, p, r.target_true) for p in r.rephrase_prompts)
        items.extend(("locality", i, p, a) for p, a in zip(r.locality_prompts, r.locality_answers))
    items.extend(("probe", j, p, a) for j, (p, a) in enumerate(probes))
    results = known(lm, [it[2] for it in items], [it[3] for it in items], args.max_new_tokens)

    per_rel: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    probe_ok: list[bool] = []
    unknown: list[str] = []
    rows = []
    for (kind, i, prompt, target), (ok, text) in zip(items, results):
        rows.append({"kind": kind, "case_id": facts[i].case_id if kind != "probe" else f"probe-{i}",
                     "prompt": prompt, "target": target, "known": ok, "greedy": text})
        if kind == "probe":
            probe_ok.append(ok)
        else:
            per_rel[facts[i].relation][kind].append(ok)
        if not ok:
            unknown.append(f"  [{kind}] {prompt!r} -> {target!r}; greedy: {text!r}")

    def share(xs: list[bool]) -> str:
        return f"{sum(xs):4d}/{len(xs):<4d} {sum(xs) / len(xs):6.1%}" if xs else "   -/-         "

    print(f"default model: {lm.display_name} ({lm.model_hash}) on {lm.device}; {time.time() - t0:.0f} s")
    print(f"{'relation':<18} {'facts known':>16}  {'paraphrases known':>18}  {'locality known':>16}")
    totals: dict[str, list[bool]] = defaultdict(list)
    for rel in sorted(per_rel):
        d = per_rel[rel]
        for kind in ("prompt", "rephrase", "locality"):
            totals[kind].extend(d[kind])
        print(f"{rel:<18} {share(d['prompt']):>16}  {share(d['rephrase']):>18}  {share(d['locality']):>16}")
    print(f"{'ALL':<18} {share(totals['prompt']):>16}  {share(totals['rephrase']):>18}  "
          f"{share(totals['locality']):>16}")
    print(f"relations: {len(per_rel)}; facts: {len(facts)}; locality probes known: {share(probe_ok)}")
    if args.show_unknown and unknown:
        print("not known:")
        print("\n".join(unknown))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1, ensure_ascii=False)
    fact_share = sum(totals["prompt"]) / max(1, len(totals["prompt"]))
    probe_share = sum(probe_ok) / max(1, len(probe_ok))
    if fact_share < args.min_share or probe_share < args.min_probe_share:
        print(f"FAIL: facts {fact_share:.1%} (need {args.min_share:.0%}), probes {probe_share:.1%} "
              f"(need {args.min_probe_share:.0%})")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
