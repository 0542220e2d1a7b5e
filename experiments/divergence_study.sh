#!/usr/bin/env bash
# When does the MNIST noise pivot run (the paper's stop-gradient L_dist) diverge, and what removes it?
#
#   nohup experiments/divergence_study.sh 1000 /data/runs > /data/runs/divergence.log 2>&1 &
#
# Each variant trains `configs/mnist.py:mode=pivot,perturb=noise` (or its control) for STEPS steps at
# the schedule's first learning rate (no decay: the first STEPS steps of the paper's 9,000-step
# schedule, which keeps lr = 0.1 until step 4,000), for each seed in SEEDS (default "0 1 2"). A run
# that diverges stops with the loop's non-finite-loss error, whose step is recorded. Idempotent: a
# finished or diverged run is not run again. The summary (status, step, accuracy per variant and
# seed) is written to RUN_ROOT/divergence_STEPS/summary.json and .md. A training stopped for
# preemption (SIGTERM) ends the script with status 75: run it again to resume.
set -uo pipefail
steps="${1:?usage: $0 STEPS RUN_ROOT}"
root="${2:?usage: $0 STEPS RUN_ROOT}"
seeds="${SEEDS:-0 1 2}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${root}/divergence_${steps}"
mkdir -p "$out"

# Variant name, config argument, overrides.
variants=(
  "pivot|mode=pivot,perturb=noise|"
  "mixed_paired|mode=mixed,perturb=noise|--config.loss.paired=True"
  "pivot_symmetric|mode=pivot,perturb=noise|--config.loss.symmetric=True"
  "pivot_warmup500|mode=pivot,perturb=noise|--config.optim.warmup_steps=500"
  "pivot_lr0.05|mode=pivot,perturb=noise|--config.optim.learning_rate=0.05"
  "pivot_lam2_1e-5|mode=pivot,perturb=noise|--config.loss.lam2=1e-5"
)

for seed in $seeds; do
  for variant in "${variants[@]}"; do
    IFS='|' read -r name arg overrides <<< "$variant"
    workdir="${out}/${name}_seed${seed}"
    log="${workdir}.log"
    if [[ -f "${workdir}/eval/results.json" ]] || grep -q "non-finite" "$log" 2>/dev/null; then
      echo "== ${name} seed ${seed}: done"
      continue
    fi
    echo "== ${name} seed ${seed}: $(date -u +%FT%TZ)"
    start=$SECONDS
    # shellcheck disable=SC2086  # $overrides is zero or one flag
    (cd "$repo" && python -m pivot_jax.train "--config=${repo}/configs/mnist.py:${arg}" "--workdir=${workdir}" \
        "--config.num_train_steps=${steps}" "--config.seed=${seed}" "--config.optim.lr_boundaries=()" \
        "--config.checkpoint_every_steps=$(( steps / 4 ))" "--config.eval_every_steps=${steps}" \
        "--config.log_every_steps=50" $overrides) >> "$log" 2>&1  # a resumed run's log keeps its start
    status=$?
    echo "== ${name} seed ${seed}: exit ${status} after $((SECONDS - start)) s"
    if (( status == 0 )) && [[ ! -f "${workdir}/eval/results.json" ]]; then
      echo "== ${name} seed ${seed}: stopped before step ${steps} (preempted); run the same command to resume"
      exit 75
    fi
  done
done

python - "$out" "$steps" <<'EOF'
import json, pathlib, re, sys

out, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
rows = {}
for log in sorted(out.glob("*_seed*.log")):
    name, seed = log.stem.rsplit("_seed", 1)
    text = log.read_text()
    diverged = re.search(r"non-finite (\w+) by step (\d+)", text)
    results = out / log.stem / "eval" / "results.json"
    row = {"seed": int(seed)}
    if diverged:
        row.update(status="diverged", step=int(diverged.group(2)), evidence=diverged.group(0))
    elif results.exists():
        saved = json.loads(results.read_text())
        row.update(status="finished", step=saved["step"], accuracy=saved["accuracy"])
    else:
        row.update(status="incomplete")
    l_dist = [float(v) for v in re.findall(r"train/l_dist=([0-9.e+-]+|nan|inf)", text)]
    if l_dist:
        row["max_logged_l_dist"] = max(l_dist)
    rows.setdefault(name, []).append(row)
(out / "summary.json").write_text(json.dumps({"steps": steps, "variants": rows}, indent=1) + "\n")
lines = [f"| variant | seed | status | step | clean | noise_0.15 | max logged L_dist |", "|---|---|---|---|---|---|---|"]
for name, runs in rows.items():
    for r in sorted(runs, key=lambda r: r["seed"]):
        acc = r.get("accuracy", {})
        fmt = lambda k: f"{100 * acc[k]:.2f}" if k in acc else "-"
        lines.append(f"| {name} | {r['seed']} | {r['status']} | {r.get('step', '-')} | {fmt('clean')} | "
                     f"{fmt('noise_0.15')} | {r.get('max_logged_l_dist', float('nan')):.4g} |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
