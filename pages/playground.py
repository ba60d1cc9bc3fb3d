"""Playground: make one edit, see what changed, undo it. A teaching demo; the edit runs in the worker process."""
import streamlit as st

from app import backend, figures, settings, ui

ui.header("Playground", "Rewrite one fact and watch the model's answers change: greedy continuations and next-token "
          "probabilities before and after the edit, on the edit prompt, a paraphrase (does it generalise?) and an "
          "unrelated prompt (does anything else move?). Edits stack; Undo removes the last one.")

queue = ui.queue()
if "pg_stack" not in st.session_state:
    st.session_state.pg_stack = []  # [{"spec": {...}, "result": {...}, "job_id": str}]


def top_job() -> str | None:
    """The job of the last edit on the stack."""
    return st.session_state.pg_stack[-1]["job_id"] if st.session_state.pg_stack else None


# The URL's ?job= names the top of the stack (or the edit in progress); each job's payload lists the jobs under it,
# so a reload or a shared link rebuilds the same stack from the job queue and Undo keeps working.
url_job = st.query_params.get("job")
if url_job and url_job not in (top_job(), st.session_state.get("pg_pending")):
    try:
        st.session_state.pg_stack, url_state = backend.playground_state(queue, url_job)
    except KeyError:
        st.warning(f"No playground edit {url_job!r} in this workbench's job queue; showing the current playground.")
    else:
        st.session_state.pg_pending = url_state.job_id if url_state.status in ("queued", "running") else None
        if url_state.status == "failed":
            st.session_state.pg_error = url_state.error
stack = st.session_state.pg_stack
ui.qp_set(job=st.session_state.get("pg_pending") or top_job())
methods = backend.available_methods()
facts = backend.builtin_requests()

c1, c2 = st.columns([3, 2])
with c1:
    # ?fact=N reopens built-in fact N (counted from 1); ?fact=own the typed form
    url_fact = st.query_params.get("fact")
    mode = st.radio("Fact", ["built-in", "type your own"], horizontal=True, key="pg-mode",
                    index=1 if url_fact == "own" else 0)
    if mode == "built-in" and facts:
        labels = [f"{f['prompt']} … {f['target_true'] or '?'} → {f['target_new']}" for f in facts]
        want = ui.qp_int("fact", 1)
        i = st.selectbox("Built-in fact", range(len(facts)), format_func=labels.__getitem__, key="pg-fact",
                         index=want - 1 if want is not None and 1 <= want <= len(facts) else 0)
        request = dict(facts[i])
        ui.qp_set(fact=i + 1)
    else:
        ui.qp_set(fact="own")
        if mode == "built-in":
            st.caption("No built-in facts are installed yet; type one.")
        prompt = st.text_input("Prompt (contains the subject)", "The Eiffel Tower is located in the city of",
                               key="pg-prompt")
        subject = st.text_input("Subject", "The Eiffel Tower", key="pg-subject")
        a, b = st.columns(2)
        target_new = a.text_input("New target", "Rome", key="pg-new")
        target_true = b.text_input("Current answer (optional)", "Paris", key="pg-true")
        paraphrase = st.text_input("Paraphrase (optional)", "Where is the Eiffel Tower? It is in", key="pg-para")
        a, b = st.columns(2)
        loc_prompt = a.text_input("Unrelated prompt (optional)", "The capital of Japan is", key="pg-loc")
        loc_answer = b.text_input("Its answer", "Tokyo", key="pg-loca")
        request = {"case_id": "playground", "prompt": prompt, "subject": subject, "target_new": target_new,
                   "target_true": target_true, "rephrase_prompts": [paraphrase] if paraphrase else [],
                   "locality_prompts": [loc_prompt] if loc_prompt and loc_answer else [],
                   "locality_answers": [loc_answer] if loc_prompt and loc_answer else []}
with c2:
    model = st.selectbox("Model", settings.model_choices(), key="pg-model")
    method = st.selectbox("Method", methods, index=methods.index("rome") if "rome" in methods else 0,
                          key="pg-method")
    st.caption(backend.method_summary(method))
    with st.expander("Method settings"):
        overrides = ui.method_config_widgets(method, "pg")
    b1, b2 = st.columns(2)
    pending = st.session_state.get("pg_pending")
    if b1.button("Apply edit", type="primary", icon=":material/edit:", disabled=bool(pending), key="pg-apply"):
        payload = {"model": model, "method": method, "overrides": overrides, "request": request,
                   "stack": [s["spec"] for s in stack if s["spec"]["model"] == model],
                   "stack_jobs": [s["job_id"] for s in stack], "top_k": 5, "max_new_tokens": 12}
        try:
            st.session_state.pg_pending = backend.submit_playground(queue, payload, device=settings.device_setting())
        except backend.JobError as exc:
            st.error(str(exc))
        else:
            ui.qp_set(job=st.session_state.pg_pending)
            st.rerun()
    if b2.button("Undo last edit", icon=":material/undo:", disabled=not stack or bool(pending), key="pg-undo"):
        stack.pop()
        ui.qp_set(job=top_job())
        st.rerun()


@st.fragment(run_every=1.0)
def wait_for_edit() -> None:
    job_id = st.session_state.get("pg_pending")
    if not job_id:
        return
    ui.housekeeping()
    job = backend.get_job(queue, job_id)
    if job.status in ("queued", "running"):
        st.info(f"Editing in the worker… ({job.status}; the first edit loads the model and may take a while)",
                icon=":material/hourglass_top:")
        if st.button("Cancel", key="pg-cancel"):
            queue.cancel(job_id)
        return
    st.session_state.pg_pending = None
    if job.status == "finished":
        st.session_state.pg_stack.append(backend.playground_entry(job))
    elif job.status == "failed":
        st.session_state.pg_error = job.error
    ui.qp_set(job=top_job())
    st.rerun()


wait_for_edit()
if st.session_state.get("pg_error"):
    st.error(f"The edit failed: {st.session_state.pg_error.splitlines()[0]}")
    with st.expander("Error details"):
        st.code(st.session_state.pg_error, language=None)
    if st.button("Dismiss", key="pg-dismiss"):
        st.session_state.pg_error = None
        st.rerun()

shown = stack[-1]["result"] if stack else None

if stack:
    st.subheader(f"Edits applied in this playground ({len(stack)})")
    for k, s in enumerate(stack, 1):
        r = s["spec"]["request"]
        st.markdown(f"{k}. **{s['spec']['method']}**: {r['prompt']} → *{r['target_new']}*")
if shown is None:
    st.info("The model is unedited. Choose a fact and a method, then **Apply edit**.")
    st.stop()

ex = shown["explanation"]
st.subheader("What the method did")
lines = []
for p in ex["params"]:
    rel = f" ({p['rel_norm']:.2%} of ‖W‖)" if p.get("rel_norm") is not None else ""
    lines.append(f"- changed `{p['param']}` (layer {p['layer']}, {p['kind']}): a rank-{p['rank']} update with "
                 f"‖ΔW‖_F = {p['delta_norm']:.4g}{rel}, largest entry change {p['max_abs']:.3g}")
st.markdown(f"**{ex['method']}** — {ex['summary']}  \n" + "\n".join(lines))
st.info(backend.explain_in_words(ex, stack[-1]["spec"]["request"]), icon=":material/school:")
st.caption(f"Computed in {ex['seconds']:.1f} s by the worker. Rank = number of independent directions of the change "
           "(ROME writes one key→value association: rank 1). ‖ΔW‖/‖W‖ = how large the change is next to the weight.")

for k, probe in enumerate(shown["probes"]):
    b, a = probe["before"], probe["after"]
    with st.container(border=True):
        st.markdown(f"**{probe['role'].capitalize()}**: {probe['prompt']}")
        m1, m2, m3 = st.columns(3)
        # model text as text (newlines and markdown characters in a continuation are not formatting)
        m1.caption("before")
        m1.code("…" + b["continuation"], language=None, wrap_lines=True)
        m2.caption("after")
        m2.code("…" + a["continuation"], language=None, wrap_lines=True)
        if b.get("p_new") is not None:
            label = "P(answer)" if probe["role"] == "locality prompt" else "P(new target)"
            m3.metric(f"{label}: before {ui.fmt_prob(b['p_new'])}, after", ui.fmt_prob(a["p_new"]),
                      ui.fmt_prob(a["p_new"] - b["p_new"], signed=True),
                      help="Probability of the whole target (product over its tokens, teacher-forced).")
        if b.get("p_true") is not None:
            m3.metric(f"P(old answer): before {ui.fmt_prob(b['p_true'])}, after", ui.fmt_prob(a["p_true"]),
                      ui.fmt_prob(a["p_true"] - b["p_true"], signed=True))
        st.plotly_chart(figures.probs_figure(b["top"], a["top"], title="top-5 next tokens"), key=f"pg-probs-{k}")
