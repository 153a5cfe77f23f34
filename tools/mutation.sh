#!/usr/bin/env bash
# Mutation testing of lightning_gmc/methods/, lightning_gmc/transport/, lightning_gmc/hook/ and
# lightning_gmc/compressors/sparse.py (with its index helpers, selection.py) with mutmut (docs/testing.md, "Mutation testing"). Not in CI.
#
#   .venv/bin/pip install -e ".[mutation]"
#   bash tools/mutation.sh                                 # every mutant
#   bash tools/mutation.sh "lightning_gmc.methods.gmc.*"   # only mutants whose names match
#
# mutmut copies the package into mutants/, runs the fast in-process tests listed under [tool.mutmut]
# in pyproject.toml once to record which test reaches which function, then runs, for each mutant, only
# the tests that reach the mutated function. The multi-process tests are not in that subset (too slow
# per mutant); tools/planted_bugs.py runs them against hand-planted bugs instead. The summary
# (per file: killed, survived, no test reaches it; the survivors by class) is printed and written to
# mutants/summary.md, and every survivor's diff, grouped by class, to mutants/survivors.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
JOBS="${MUTATION_JOBS:-2}"
# mutmut limits each mutant's CPU time; spinning OpenMP threads would count against it.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if [ "$#" -eq 0 ]; then
    rm -rf mutants  # a fresh run: mutmut would otherwise reuse results of an older tree
fi
nice -n 10 "$PYTHON" -m mutmut run --max-children "$JOBS" "$@" >/dev/null
"$PYTHON" -m mutmut results --all true >mutants/results.txt
"$PYTHON" tools/mutation_summary.py  # prints; writes mutants/summary.md and mutants/survivors.md
