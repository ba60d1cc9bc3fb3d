#!/usr/bin/env bash
# Mutation testing of one seed method's maths with mutmut 3 (pip install mutmut), outside CI: the default pytest
# run never starts it. It works on a throw-away copy of the repository (mutmut writes mutants/ and its own setup.cfg
# there), so the worktree is left untouched.
#
#   scripts/mutation.sh geoedit             # every mutant of GeoEdit's maths (editors/geoedit.py)
#   scripts/mutation.sh adaedit|mose|agrade # the same for AdaEdit's SRFusion / DR / top-k (editors/adaedit.py), MOSE's
#                                           # Procrustes and Eq. 22 (editors/mose.py), AGRADE's Eq. 1-7
#                                           # (editors/agrade.py)
#   scripts/mutation.sh geoedit 'x_fuse*'   # only the mutants whose names match (mutmut's names: x_<function>,
#                                           # xǁ<Class>ǁ<method>)
#
# Two passes: every mutant against the fast maths tests (tests/unit/test_geoedit_maths.py, seconds per mutant), then
# the survivors against the maths and the editor-level tests on tiny models as well (tests/unit/test_geoedit.py,
# minutes per mutant on two cores; MUTATION_FULL=0 skips it). Prints the mutation score and lists the survivors
# (`mutmut show NAME` in the copy prints a mutant's diff).
#
# Env: MUTATION_FUNCTIONS / MUTATION_FAST_TESTS (override the method's function list / first-pass tests),
# MUTATION_TIMEOUT_CONSTANT (mutmut's timeout_constant, default 10: a mutant's CPU-time limit is
# (its tests' measured time + this) x 30 s; mutmut's own default 1 times healthy mutants out on a loaded machine,
# where a test process's imports and tiny-model fixtures alone take longer), OMP_NUM_THREADS (default 1), MUTATION_DIR (default /tmp/editbench-mutation-<method>), MUTATION_CHILDREN (parallel workers, default 1 on a
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
  adaedit)
    module="editors.adaedit"
    source="editors/adaedit.py"
    # the fast pass: SRFusion written out step by step, T_k, resolve_k (node ids: no spaces in the selection)
    eq="tests/unit/test_seed_equations.py"
    fast_tests="$eq::test_sr_fusion_matches_the_steps_written_out $eq::test_hard_threshold_keeps_largest_magnitudes
                tests/unit/test_mose_adaedit_rect_prune.py::test_resolve_k_counts_and_fractions
                tests/unit/test_mose_adaedit_rect_prune.py::test_hard_threshold_dr_and_topk
                tests/unit/test_mose_adaedit_rect_prune.py::test_sr_fusion_without_thresholding_is_the_truncated_svd
                $eq::test_sr_factors_and_sr_fusion_use_the_svd_they_are_given $eq::test_sr_factors_drops_zero_singular_values
                $eq::test_random_drop_mask_is_the_seeded_float64_draw
                $eq::test_topk_magnitude_keeps_at_least_one_and_breaks_ties_to_the_lower_index
                tests/unit/test_precision.py::test_randomized_top_svd_matches_exact
                tests/unit/test_precision.py::test_top_svd_shapes_auto_boundary_and_seeded_determinism"
    full_tests="tests/unit/test_mose_adaedit_rect_prune.py tests/unit/test_seed_equations.py tests/unit/test_precision.py"
    # the paper's maths (section 4.2 and the DR / top-k strategies of section 3.1). The editor's solve/fuse wiring
    # is covered by the full pass (test_adaedit_editor_deltas_are_srfusion_sparse, the residual-site tests).
    functions="x_resolve_k x__top_indices x_hard_threshold x_top_svd x_sr_factors x_sr_fusion x_random_drop
               x_topk_magnitude"
    ;;
  mose)
    module="editors.mose"
    source="editors/mose.py"
    eq="tests/unit/test_seed_equations.py"
    fast_tests="$eq::test_procrustes_minimises_eq17_against_perturbed_rotations
                $eq::test_procrustes_diagnostics_known_angle_scale_and_degenerate_cases
                $eq::test_layer_score_is_eq22_with_the_activation_norm
                tests/unit/test_mose_adaedit_rect_prune.py::test_procrustes_recovers_a_known_rotation
                tests/unit/test_mose_adaedit_rect_prune.py::test_rotation_is_orthogonal_and_identity_for_huge_lambda
                tests/unit/test_mose_adaedit_rect_prune.py::test_layer_score_and_neighbours
                tests/unit/test_precision.py::test_max_rotation_angle_matches_eigvals"
    full_tests="tests/unit/test_mose_adaedit_rect_prune.py tests/unit/test_seed_equations.py tests/unit/test_precision.py"
    # Eq. 17-20 (Procrustes and its diagnostics), Eq. 22, the spectral norm and the neighbour rule
    functions="x_procrustes_rotation x_max_rotation_angle x_layer_score x_spectral x_edit_layers_around"
    ;;
  agrade)
    module="editors.agrade"
    source="editors/agrade.py"
    t="tests/unit/test_agrade.py"
    fast_tests="$t::test_eq4_leaves_G_orthogonal_to_G_prev $t::test_eq1_coefficients
                $t::test_scaled_gradient_and_project_gradients_on_tensors
                $t::test_eq1_and_eq2_as_used_inside_predict $t::test_use_c_false_is_the_ablation_without_c
                $t::test_eq4_inside_predict_against_the_chosen_previous_G $t::test_eq6_is_autograds_gradient_of_the_edit_objective
                $t::test_weight_projection_false_is_P_equals_H_g $t::test_lambda_term_is_the_derivative_of_the_edit_objective
                $t::test_agrade_spectral_artifacts $t::test_agrade_artifacts_and_projection
                $t::test_predict_solves_eq5_with_or_without_the_regulariser"
    full_tests="$t"
    # Eq. 1-7 as the editor computes them (predict, the projected gradient, the hyper loss). Not the artifacts
    # (_extras: covered by test_agrade_spectral_artifacts / test_agrade_artifacts_and_projection in the full pass)
    functions="x_adjustment_coefficients x_orthogonalise x_scaled_gradient x_project_gradients
               xǁAGRADEEditorǁpredict xǁAGRADEEditorǁprojected_gradient xǁAGRADEEditorǁhyper_loss
               xǁAGRADEEditorǁ_lam"
    ;;
  *) echo "no mutation set-up for method '$method' (known: geoedit, adaedit, mose, agrade)" >&2; exit 2 ;;
esac
functions="${MUTATION_FUNCTIONS:-$functions}"      # e.g. MUTATION_FUNCTIONS='x_sr_factors x_hard_threshold'
fast_tests="${MUTATION_FAST_TESTS:-$fast_tests}"
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
timeout_constant=${MUTATION_TIMEOUT_CONSTANT:-10}
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
