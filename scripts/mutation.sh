#!/usr/bin/env bash
# Mutation testing of one seed method's maths with mutmut 3 (pip install mutmut), outside CI: the default pytest
# run never starts it. It works on a throw-away copy of the repository (mutmut writes mutants/ and its own setup.cfg
# there), so the worktree is left untouched.
#
#   scripts/mutation.sh geoedit             # every mutant of GeoEdit's maths (editors/geoedit.py)
#   scripts/mutation.sh geoedit 'x_fuse*'   # only the mutants whose names match (mutmut's names: x_<function>,
#                                           # xǁ<Class>ǁ<method>)
#
# Two passes: every mutant against the fast maths tests (tests/unit/test_geoedit_maths.py, seconds per mutant), then
# the survivors against the maths and the editor-level tests on tiny models as well (tests/unit/test_geoedit.py,
# minutes per mutant on two cores; MUTATION_FULL=0 skips it). Prints the mutation score and lists the survivors
# (`mutmut show NAME` in the copy prints a mutant's diff).
#
# Env: OMP_NUM_THREADS (default 1), MUTATION_DIR (default /tmp/editbench-mutation-<method>), MUTATION_CHILDREN (parallel workers, default 1 on a
# shared machine), MUTATION_FULL (default 1).
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"  # one core per test process
method="${1:?usage: scripts/mutation.sh METHOD [MUTANT_GLOB]}"
glob="${2:-}"
root="$(cd "$(dirname "$0")/.." && pwd)"
case "$method" in
  geoedit)
    module="editors.geoedit"
    source="editors/geoedit.py"
    fast_tests="tests/unit/test_geoedit_maths.py"
    full_tests="tests/unit/test_geoedit.py"
    # the maths: plain functions named after the paper's steps and the linear auto-encoder. Not the editor's
    # orchestration (edit_with_details, _train_ae: covered by test_geoedit.py's manual recomputations), the config's
    # validation, the variant label's wording or the ReLU MLP kept for comparison.
    functions="x_row_angles x_classify x_fuse x_average_ranks x_minmax x_rank_scale x_normalise_importance
               x_spearman x_kl_divergence x_train_autoencoder x_geometric_edit x_to_neurons x_from_neurons
               x_make_autoencoder xǁLinearAEǁ"
    ;;
  *) echo "no mutation set-up for method '$method' (known: geoedit)" >&2; exit 2 ;;
esac
command -v mutmut >/dev/null || { echo "mutmut is not installed: pip install mutmut" >&2; exit 2; }
work="${MUTATION_DIR:-/tmp/editbench-mutation-$method}"
rm -rf "$work"
mkdir -p "$work"
(cd "$root" && tar cf - --exclude=__pycache__ editors analysis tests pyproject.toml) | (cd "$work" && tar xf -)
cd "$work"

configure() {  # $1: the test files (one per line)
  cat > setup.cfg <<CFG
[mutmut]
source_paths=editors/
only_mutate=$source
also_copy=
    analysis/
pytest_add_cli_args_test_selection=
$(printf '    %s\n' $1)
pytest_add_cli_args=-p no:cacheprovider -q -x
process_isolation=forkserver
do_not_mutate_patterns=
    log\.(debug|info|warning)
    raise (EditError|ValueError)
CFG
}

names=()
if [ -n "$glob" ]; then
  names=("$module.$glob")
else
  for f in $functions; do names+=("$module.${f}*"); done
fi
patterns=$(printf '%s\n' "${names[@]}")

select_results() {  # $1: status to keep (or "any"); prints "name status" of the selected functions' mutants
  mutmut results --all true 2>/dev/null | python3 -c '
import fnmatch, re, sys
want, patterns = sys.argv[1], sys.argv[2].split()
for line in sys.stdin:
    m = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
    if m and any(fnmatch.fnmatch(m.group(1), p) for p in patterns) and (want == "any" or m.group(2).strip() == want):
        print(m.group(1), m.group(2).strip())
' "$1" "$patterns"
}

echo "== pass 1: every mutant against $fast_tests"
configure "$fast_tests"
mutmut run --max-children "${MUTATION_CHILDREN:-1}" "${names[@]}" > pass1.log 2>&1 || true
mapfile -t survivors < <(select_results survived | cut -d' ' -f1)
echo "   survivors after pass 1: ${#survivors[@]}"
if [ "${MUTATION_FULL:-1}" != 0 ] && [ "${#survivors[@]}" -gt 0 ]; then
  echo "== pass 2: the survivors against $fast_tests and $full_tests"
  configure "$fast_tests
$full_tests"
  mutmut run --max-children "${MUTATION_CHILDREN:-1}" "${survivors[@]}" > pass2.log 2>&1 || true
fi
select_results any > results.txt
python3 - results.txt <<'PY'
import collections, sys
rows = [line.split(" ", 1) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
counts = collections.Counter(status.strip() for _, status in rows)
print("results:", dict(counts))
tried = sum(v for k, v in counts.items() if k not in ("not checked", "skipped"))
killed = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("segfault", 0)
if tried:
    print(f"mutation score: {killed}/{tried} = {killed / tried:.1%} (killed, timed out or crashed / tried)")
for name, status in rows:
    if status.strip() not in ("killed", "timeout", "segfault"):
        print(f"  {status.strip():12s} {name}")
PY
echo "copy: $work (cd there and run 'mutmut show NAME' for a mutant's diff; remove it when done)"
