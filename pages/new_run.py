"""New run: configure a sequential editing run, submit it to the worker, watch its progress."""
import streamlit as st

from app import backend, settings, ui, views

ui.header("New run", "Edit the model step by step (never rolled back) and record what happens. The run executes in "
          "the worker process; you can leave this page or reload it -- the run keeps going and shows up below and "
          "on Runs.")

store, queue = ui.store(), ui.queue()
methods = backend.available_methods()

left, right = st.columns([3, 2])
with left:
    st.subheader("Model and method")
    model = st.selectbox("Model", settings.model_choices(), key="nr-model",
                         help="'default' is the embedded SmolLM2-135M-Instruct; more choices (model directories or "
                              "hub ids) come from EDITBENCH_MODELS.")
    chosen = st.multiselect("Method(s) — one run per method", methods, key="nr-methods",
                            default=["rome"] if "rome" in methods else methods[:1],
                            help="Several methods = several runs with the same data and cadence, to compare.")
    overrides = {}
    for m in chosen:
        with st.expander(f"{m} settings — {backend.method_summary(m)}"):
            overrides[m] = ui.method_config_widgets(m, "nr")
    st.subheader("Data")
    source = st.radio("Edit requests", ["built-in facts", "CounterFact file", "zsRE file", "upload"],
                      horizontal=True, key="nr-source")
    data = "builtin"
    if source == "CounterFact file":
        data = "counterfact:" + st.text_input("CounterFact JSON path",
                                              "../shared/data/counterfact/counterfact-edit.json", key="nr-cf")
    elif source == "zsRE file":
        data = "zsre:" + st.text_input("zsRE JSON path", "../shared/data/zsre/zsre-800.json", key="nr-zsre")
    elif source == "upload":
        up = st.file_uploader("Your edits (JSON, JSONL or CSV with prompt, subject, target_new, ...)",
                              type=["json", "jsonl", "csv"], key="nr-upload")
        data = ""
        if up is not None:
            try:
                reqs = backend.parse_upload(up.getvalue(), up.name)
            except backend.JobError as exc:
                st.error(str(exc))
            else:
                data = backend.save_upload(store.runs_dir, reqs, up.name)
                st.success(f"{len(reqs)} edit requests read from {up.name}.")
    if data.startswith(("counterfact:", "zsre:")):  # server paths: only inside the configured data folders
        try:
            backend.check_data_source(data)
        except backend.JobError as exc:
            st.error(str(exc))
            data = ""
with right:
    st.subheader("Schedule")
    n_edits = st.number_input("Number of edits", 1, 100000, 10, key="nr-n",
                              help="The first n requests of the data are edited in order.")
    batch_size = st.number_input("Batch size (edits per step)", 1, 10000, 1, key="nr-bs")
    eval_every = st.number_input("Checkpoint every … steps (0 = only at the end)", 0, 100000, 5, key="nr-every",
                                 help="At each checkpoint every edit made so far is re-scored (retention), plus "
                                      "locality probes, general abilities and weight diagnostics.")
    schedule = st.selectbox("Checkpoint schedule", ["every", "geometric"], key="nr-schedule",
                            help="every: every … steps (above). geometric: after steps 1, 2, 5, 10, 20, 50, ... "
                                 "(total evaluation cost linear in the number of edits; for long runs).")
    retention_sample = st.number_input("Retention sample (0 = every edit so far)", 0, 100000, 0, key="nr-rsample",
                                       help="Re-score a seeded sample of at most K edits so far at each checkpoint, "
                                            "one from each of K equal parts of the run (early edits stay "
                                            "represented). 0 = exact: all of them.")
    st.subheader("Diagnostics")
    weights = st.checkbox("Weight diagnostics (norms, condition numbers, spectra)", True, key="nr-weights")
    angles = st.checkbox("Successive-update angles", True, key="nr-angles")
    hidden = st.checkbox("Hidden states of the probe set (for the Hidden states page)", False, key="nr-hidden")
    general = st.selectbox("General-ability probes", ["builtin", "none"], key="nr-general",
                           help="Small zero-shot tasks scored at the start and at every checkpoint.")
    locality = st.selectbox("Locality probe set", ["builtin", "none"], key="nr-locality",
                            help="Unrelated facts scored against the UNEDITED model at every checkpoint (drift).")
    run_protocols, protocol_help = views.protocols(stored=False)
    protocols = st.multiselect("Protocols", run_protocols, default=["tf_token_acc", "prob_margin"],
                               key="nr-protocols",
                               help="; ".join(f"{k}: {protocol_help[k]}" for k in run_protocols)
                               + ". wild_gen also records wild_gen_f1 and generates up to 50 tokens per prompt: "
                                 "slower than the teacher-forced protocols.")
    devices = ["auto", "cpu"] + (["cuda"] if backend.cuda_available() else [])
    device = st.selectbox("Device", devices, key="nr-device", help="auto = CUDA when present, else CPU.")
    dtype = st.selectbox("Precision", ["auto", "float32", "bfloat16", "float16"], key="nr-dtype",
                         help="Weights' dtype. auto = bfloat16 on a CUDA GPU with bf16 support, float32 elsewhere. "
                              "Edit maths is float32 either way; updates are rounded once when applied.")
    seed = st.number_input("Seed", 0, 2 ** 31 - 1, 0, key="nr-seed")
    label = st.text_input("Label (optional)", key="nr-label")

if st.button("Start", type="primary", icon=":material/play_arrow:", disabled=not chosen or not data, key="nr-start"):
    started = []
    for m in chosen:
        config = {"model": model, "method": m, "method_overrides": overrides.get(m, {}), "data": data,
                  "n_edits": int(n_edits), "batch_size": int(batch_size), "eval_every": int(eval_every),
                  "checkpoint_schedule": schedule, "retention_sample": int(retention_sample), "dtype": dtype,
                  "weights": weights, "update_angles": angles, "hidden_states": hidden, "general": general,
                  "locality_probes": locality,
                  "protocols": protocols or ["tf_token_acc"], "seed": int(seed), "label": label}
        try:
            run_id, _ = backend.submit_run(store, queue, config, device=device)
        except backend.JobError as exc:
            st.error(f"{m}: {exc}")
        else:
            started.append(run_id)
    if started:
        ui.qp_set(runs=started)
        st.toast(f"queued {len(started)} run(s)")


@st.fragment(run_every=1.5)
def progress() -> None:
    """Live progress of active runs and of the runs named in the URL (polls the store)."""
    ui.housekeeping()  # a worker that died -> its run shows failed here, with the worker's last log lines
    watched = list(dict.fromkeys(backend.active_runs(store) + ui.qp_list("runs")))
    if not watched:
        st.caption("No run in progress.")
        return
    st.subheader("Progress")
    for rid in watched:
        try:
            p = backend.run_progress(store, queue, rid)
        except KeyError:
            continue
        with st.container(border=True):
            top = st.columns([4, 1])
            name = f"**{p.method or '?'}**" + (f" · {p.label}" if p.label else "")
            top[0].markdown(f"{ui.status_badge(p.status)} {name} `{rid}` — {p.done}/{p.planned or '?'} edits, "
                            f"{backend.format_seconds(p.seconds)} elapsed"
                            + (f", about {backend.format_seconds(p.eta_seconds)} left"
                               if p.eta_seconds and not p.cancelling else ""))
            if p.status in ("queued", "running"):
                if p.cancelling:
                    top[1].markdown(":orange-badge[:material/hourglass_top: cancelling]")
                    text = "cancelling: the run stops after its current step (its rows are kept)"
                else:
                    top[1].button("Cancel", key=f"cancel-{rid}", on_click=backend.cancel_run,
                                  args=(store, queue, rid))
                    text = "waiting for the worker" if p.status == "queued" else (
                        f"{p.phase} ({backend.format_seconds(p.phase_seconds)})" if p.phase else None)
                st.progress(min(1.0, p.fraction), text=text)
            elif p.status == "failed" or p.status == "interrupted":
                st.error(f"The run {p.status}: {(p.error or 'no error text').splitlines()[0]}")
                with st.expander("Error details"):
                    st.code(p.error or "", language=None)
            elif p.status == "finished":
                st.page_link(ui.page("metrics.py"), label="See its curves on Metrics", icon=":material/monitoring:",
                             query_params={"runs": rid})
            elif p.status == "diverged":
                st.warning(f"The run diverged (NaN/Inf): {(p.error or '').splitlines()[0]}")
            elif p.status == "cancelled":
                st.info(f"Cancelled after {p.done} edits; its rows are kept." if p.done else
                        "Cancelled before its first edit.")


progress()
