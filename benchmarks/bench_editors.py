"""Editor benchmark: seconds per edit, peak memory and reliability during SEQUENTIAL editing.

For each method and batch size, ``n_edits`` requests (or ``batch_size`` requests, as one step, when the batch is
larger) are edited in steps of ``batch_size`` on one model that is never
rolled back between steps (each result is applied, then ``after_apply`` is called), as in EVALUATION.md. Reported:

* ``setup_s``: :meth:`Editor.prepare` (context templates, covariance statistics, projectors); not part of the
  per-edit time; ``setup_cpu_s`` is its process CPU time. With a warm cache (``~/.cache/editbench`` or
  ``$EDITBENCH_CACHE``) statistics are only loaded; pass ``cache_dir`` (``--cache-dir``) pointing at an empty folder
  to time their computation (the first method computes them, later methods sharing layers load them).
* ``median_s / min_s / max_s``: wall seconds of ``edit()`` per request (a step's time divided by its batch size);
  ``median_cpu_s``: process CPU seconds per request (all threads), which is less sensitive to other processes;
  ``median_z_s / median_solve_s``: for the locate-then-edit methods, the part of ``median_s`` spent optimising the
  target values (per request, inherently per-fact work) and solving the layer updates (shared by a batch);
  ``median_features_s``: for UltraEdit, the forward+backward pass that gives keys and output gradients (its
  ``median_solve_s`` is then the per-layer ridge solves, statistics included in neither);
* ``peak_mem_mb``: peak growth during ``edit()`` over the memory before it: resident set size sampled every 20 ms
  on CPU, ``torch.cuda.max_memory_allocated`` on CUDA;
* ``rel_immediate``: mean reliability (``tf_token_acc``) of each step's requests right after the step;
  ``rel_final / gen_final / loc_final``: reliability, generality and locality of ALL edited requests on the final
  model (locality against the unedited model);
* ``machine_gflops``: fp32 matmul throughput measured at the start, so that timings taken on a busy machine can
  be put in proportion.

Run::

    python -m benchmarks.bench_editors --methods rome --n-edits 20 --threads 2 \\
        --data counterfact:../shared/data/counterfact/counterfact-edit.json

The model is restored exactly after every method (the undo of every step is applied in reverse).

Measured (2026-11-22, this 2-core CPU, quiet, torch 2 threads, the default SmolLM2-135M-Instruct, ROME preset v2,
the first 30 CounterFact edit-split records, sequential single edits)::

    python -m benchmarks.bench_editors --methods rome --n-edits 30 --threads 2 \
        --data counterfact:../shared/data/counterfact/counterfact-edit.json

ROME: median 4.43 s per edit (min 1.72, max 6.69; 8.8 CPU-seconds), peak +130 MB; rel_immediate 1.00, after the
30th edit rel_final 0.967, gen_final 0.30, loc_final 0.794. EasyEdit's ROME on the same kind of machine: ~36 s per
edit, 1.0 / 0.30 / 0.76 (issue 2), so 8x faster at equal or better quality. The v* optimisation is 96% of an edit
(median 15.5 Adam steps, early-stopped at target probability 0.95), the key 1%.

Measured (2026-11-29 and 11-30, this 2-core CPU SHARED by 3-9 one-thread processes, so wall seconds are inflated
2-5x and only the CPU-seconds are comparable; torch 1 thread; presets as shipped; CounterFact edit split)::

    python -m benchmarks.bench_editors --methods memit,pmet,emmet,alphaedit,rect,prune,adaedit,mose \
        --n-edits 10 --batch-sizes 1,10 --threads 1 --cache-dir EMPTY_DIR --per-step \
        --data counterfact:../shared/data/counterfact/counterfact-edit.json
    python -m benchmarks.bench_editors --methods METHOD --n-edits 10 --batch-sizes 100 --threads 1 \
        --data counterfact:../shared/data/counterfact/counterfact-edit.json     # one process per method
    ... --methods adaedit --set adaedit.r=100 ...
    ... --methods rect,prune --set rect.base=memit --set prune.base=memit ...

    CPU-s per edit (median)    single   batch 10   batch 100 (ratio to single)   rel_immediate (1 / 10 / 100)
    memit (layers 4-8)          6.36      5.66       6.43 (1.01)                  0.8 / 0.8 / 0.60
    pmet                        5.54      5.02       4.77 (0.86)                  0.8 / 0.8 / 0.43
    emmet                       6.66      6.07       5.91 (0.89)                  1.0 / 1.0 / 0.87
    alphaedit                   7.70      6.23       5.79 (0.75)                  1.0 / 1.0 / 0.95
    rect (on ROME)              8.25      8.60       9.60 (1.16)                  1.0 / 0.7 / 0.03
    prune (on ROME)             8.39      8.78       9.10 (1.08)                  1.0 / 1.0 / 0.46
    adaedit (r=4)               8.29      6.56       6.09 (0.73)                  1.0 / 0.6 / 0.11
    mose (score selection)     23.21     18.69      18.71 (0.81)                  0.9 / 0.9 / 0.71
    adaedit, r=100                -         -        5.96                         - / - / 0.72
    rect on MEMIT                 -         -        5.22                         - / - / 0.13
    prune on MEMIT                -         -        5.22                         - / - / 0.60

MEMIT again on the quiet machine (2026-11-30, two one-thread processes and nothing else; ``--n-edits 20
--batch-sizes 1,10`` and ``--n-edits 10 --batch-sizes 100``): 5.89 / 5.24 / 5.33 CPU-s (= wall s) per fact, so a
batch of 100 costs 0.90 of 100 single edits. Per fact, the layer solves (keys included) fall 0.92 -> 0.43 -> 0.26 s
with the batch size; the target optimisation stays 4.95 / 4.82 / 5.09 s. Peak +185 MB.

What batch 100 shows:

* ROME edits a batch as the same number of sequential rank-1 edits inside one step, so RECT and PRUNE on ROME at
  batch 100 are 100 sequential ROME edits followed by one sparsification / restraint of their sum: ROME's own
  collapse (80-100 edits, see the collapse study) plus, for RECT, a 20% mask of a delta whose entries depend on
  each other. Use them on MEMIT for batches (``--set rect.base=memit``).
* AdaEdit's SRFusion keeps ``r`` singular triples of each layer's delta, and a batch of n facts has rank up to n, so
  the preset ``r=4`` (made for single edits) throws most of a batch of 100 away (0.11); ``r=100`` keeps it (0.72).
* RECT on MEMIT keeps 20% of the entries of a rank-100 delta: 0.13. PRUNE on MEMIT returns MEMIT's delta unchanged
  at the first step (no singular value of the accumulated delta reaches σ_max(W0) yet), hence MEMIT's 0.60.

Peak memory growth during an edit (RSS over the memory before it) stayed under 330 MB everywhere (batch 100: RECT on
ROME +327 MB, PRUNE on ROME +299, AdaEdit +204, MEMIT +195, PRUNE on MEMIT +191, RECT on MEMIT +174, MOSE +165,
AdaEdit r=100 +145, AlphaEdit +64, EMMET +37; PMET +229). Target optimisation is most of every edit: MEMIT single
10.8 of 12.9 wall s (z) vs 2.1 s (five layer solves, keys included); MOSE 66 of 70 s (four targets per edit: the
three candidate layers of its selection rule and the top layer); at batch 100 the z share is 90-99% for every
locate-then-edit editor. So a batch of 100 costs 0.73-1.01 of what 100 single edits cost on this CPU (0.90 for MEMIT
on the quiet machine; RECT / PRUNE on ROME, which does not batch, 1.08-1.16), not "far less": the batched solve
saves little because it was never the cost, and the per-fact optimisation is compute-bound (batching 10 or 50 facts'
prompts into one forward+backward took 1.12x / 1.23x the time per fact of one fact alone, 1 thread). A batched
target optimisation would pay off on a GPU, where one fact's prompts leave most of the device idle. Statistics, from
an empty cache: layers 4-8 (MEMIT family) in 80.5 s wall / 43 CPU-s including the context templates; MOSE's extra
layer 3 in 77 s wall / 15 CPU-s (at load 9); every later editor of the run that needed no new layer loaded them in
under 0.03 s (``setup_s``; AlphaEdit's 4 CPU-s of setup are its null-space projectors, RECT's 6 CPU-s its ROME
base's context templates).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time
from typing import Sequence

import pandas as pd
import torch

log = logging.getLogger(__name__)


class _PeakRSS:
    """Samples the process's resident set size in a background thread (CPU peak memory of a block)."""

    def __init__(self, interval: float = 0.02):
        import psutil
        self._proc = psutil.Process()
        self.interval = interval
        self.start_rss = 0
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "_PeakRSS":
        self.start_rss = self.peak = self._proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start_rss) / 2**20


def machine_gflops(seconds: float = 1.0) -> float:
    """fp32 matmul throughput of this process right now (a [512,576] x [576,1536] product, the MLP's shape)."""
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 512 * 576 * 1536 / (time.perf_counter() - t0) / 1e9


def run_bench(methods: Sequence[str], n_edits: int = 20, batch_sizes: Sequence[int] = (1,), data: str = "builtin",
              device: str | None = None, *, lm=None, overrides: dict[str, dict] | None = None,
              use_preset: bool = True, seed: int = 0, cache_dir: str | None = None) -> pd.DataFrame:
    """One row per (method, batch size); the per-step records are in ``df.attrs["per_step"]``.

    Args:
        methods: registry names.
        data: an :func:`editors.data.load_requests` source ("builtin", "counterfact:PATH", ...).
        device: for loading the default model when ``lm`` is not given.
        lm: an already loaded model (it is restored exactly afterwards).
        overrides: per-method config overrides applied on top of the preset.
    """
    from analysis import evaluation as E
    from editors.base import apply_result
    from editors.data import load_requests
    from editors.models import load_model
    from editors.presets import build_config
    from editors.registry import get_editor_class

    if lm is None:
        lm = load_model("default", device=device)
    wanted = max([n_edits, *batch_sizes])
    pool = list(load_requests(data, wanted))
    if len(pool) < wanted:
        log.warning("data %s holds %d requests; benchmarking at most %d edits", data, len(pool), len(pool))
    reference = E.locality_reference(lm, E.locality_pairs(pool))
    cuda = lm.device.type == "cuda"
    gflops = machine_gflops()
    rows, steps = [], []
    for method in methods:
        for bs in batch_sizes:
            # n_edits requests in steps of bs; a batch larger than n_edits is timed as ONE step of bs requests
            requests = pool[:max(n_edits, bs)]
            fields_ = (overrides or {}).get(method) or {}
            cfg, preset_version = build_config(method, lm.name, fields_, use_preset=use_preset)
            editor = get_editor_class(method)(lm, cfg, cache_dir=cache_dir, seed=seed)
            t0, c0 = time.perf_counter(), time.process_time()
            editor.prepare()
            setup_s, setup_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            undos = []
            per_req_s, per_req_cpu, mems, rel_imm, z_s, solve_s, feat_s = [], [], [], [], [], [], []
            try:
                for start in range(0, len(requests), bs):
                    batch = requests[start:start + bs]
                    if cuda:
                        torch.cuda.synchronize(lm.device)
                        torch.cuda.reset_peak_memory_stats(lm.device)
                        base_mem = torch.cuda.memory_allocated(lm.device)
                        t, c = time.perf_counter(), time.process_time()
                        result = editor.edit(batch)
                        torch.cuda.synchronize(lm.device)
                        secs, cpu = time.perf_counter() - t, time.process_time() - c
                        mem = (torch.cuda.max_memory_allocated(lm.device) - base_mem) / 2**20
                    else:
                        with _PeakRSS() as peak:
                            t, c = time.perf_counter(), time.process_time()
                            result = editor.edit(batch)
                            secs, cpu = time.perf_counter() - t, time.process_time() - c
                        mem = peak.growth_mb
                    undos.append(apply_result(lm, result))
                    editor.after_apply(batch, result)
                    rel = E.summarize(E.evaluate_requests(lm, batch, reference)).get(("reliability", E.TF), 0.0)
                    per_req_s.append(secs / len(batch))
                    per_req_cpu.append(cpu / len(batch))
                    mems.append(mem)
                    rel_imm.append(rel)
                    # locate-then-edit: target optimisation vs layer solves (a RECT/PRUNE base's under "base")
                    timed = result.info if "seconds_z" in result.info else result.info.get("base", {})
                    if "seconds_z" in timed:
                        z_s.append(timed["seconds_z"] / len(batch))
                        solve_s.append(timed.get("seconds_layers", 0.0) / len(batch))
                    # UltraEdit: the forward+backward that gives the features vs the per-layer ridge solves
                    if "seconds_features" in result.info:
                        feat_s.append(result.info["seconds_features"] / len(batch))
                        solve_s.append(sum(v.get("seconds_solve", 0.0) for v in result.info.get("layer", {}).values()
                                           if isinstance(v, dict)) / len(batch))
                    steps.append({"method": method, "batch_size": bs, "step": len(rel_imm), "edits": start + len(batch),
                                  "seconds_per_edit": secs / len(batch), "cpu_seconds_per_edit": cpu / len(batch),
                                  "peak_mem_mb": mem, "reliability": rel,
                                  "z_steps": result.info.get("steps"), "target_prob": result.info.get("target_prob")})
                    log.info("%s bs=%d: %d/%d edits, %.1fs/edit, reliability %.2f", method, bs, start + len(batch),
                             len(requests), secs / len(batch), rel)
                final = E.summarize(E.evaluate_requests(lm, requests, reference))
            finally:
                for undo in reversed(undos):
                    undo(lm.model)
                editor.close()  # an adaptor editor (GRACE) detaches its hook
            rows.append({
                "method": method, "batch_size": bs, "n_edits": len(requests), "preset_version": preset_version,
                "overrides": ",".join(f"{k}={v}" for k, v in sorted(fields_.items())),
                "setup_s": setup_s, "setup_cpu_s": setup_cpu_s,
                "median_s": statistics.median(per_req_s), "min_s": min(per_req_s), "max_s": max(per_req_s),
                "median_cpu_s": statistics.median(per_req_cpu),
                "median_z_s": statistics.median(z_s) if z_s else None,
                "median_solve_s": statistics.median(solve_s) if solve_s else None,
                "median_features_s": statistics.median(feat_s) if feat_s else None,
                "peak_mem_mb": max(mems),
                "rel_immediate": sum(rel_imm) / len(rel_imm),
                "rel_final": final.get(("reliability", E.TF)),
                "gen_final": final.get(("generality", E.TF)),
                "loc_final": final.get(("locality", E.TF)),
                "device": str(lm.device), "threads": torch.get_num_threads(), "machine_gflops": gflops,
            })
    df = pd.DataFrame(rows)
    df.attrs["per_step"] = pd.DataFrame(steps)
    return df


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="rome", help="comma-separated registry names")
    ap.add_argument("--n-edits", type=int, default=20,
                    help="sequential edits per batch size, in steps of the batch size; a batch size larger than "
                         "this is run as one step of that many requests")
    ap.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes")
    ap.add_argument("--data", default="builtin", help="editors.data source: builtin, counterfact:PATH, zsre:PATH")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--cache-dir", default=None, help="cache folder (an empty one times the statistics)")
    ap.add_argument("--per-step", action="store_true", help="also print every step")
    ap.add_argument("--csv", default=None, help="write the summary table to this CSV file")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="a config field of one method on top of its preset (repeatable), e.g. adaedit.r=100; "
                         "shown in the 'overrides' column")
    args = ap.parse_args(argv)
    from editors.registry import UnknownMethodError, get_editor_class
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:  # before the model loads: a typo costs a line, not a minute and a traceback
        try:
            get_editor_class(method)
        except UnknownMethodError as exc:
            ap.error(str(exc))
    from editors.base import ConfigError
    from editors.fields import parse_method_sets
    from editors.presets import build_config
    try:
        overrides = parse_method_sets(args.sets, methods)
        for method, fields_ in overrides.items():  # names and values checked now, on top of the default's preset
            build_config(method, "default", fields_)
    except ConfigError as exc:
        ap.error(str(exc))
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        ap.error(f"--batch-sizes expects comma-separated integers, got {args.batch_sizes!r}")
    if not methods or any(b < 1 for b in batch_sizes) or args.n_edits < 1 or args.threads < 1:
        ap.error("--methods must name at least one method; --batch-sizes, --n-edits and --threads must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    df = run_bench(methods, n_edits=args.n_edits, batch_sizes=batch_sizes, data=args.data, device=args.device,
                   cache_dir=args.cache_dir, overrides=overrides)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
        print(df.to_string(index=False))
        if args.per_step:
            print(df.attrs["per_step"].to_string(index=False))
    if args.csv:
        df.to_csv(args.csv, index=False)
    return df


if __name__ == "__main__":
    main()
