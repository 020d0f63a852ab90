"""
Experiments over many train.py runs: seeds, grids and scaling curves, one table.
    python sweep.py config/speedrun.py --seeds=3                                   # mean +- std over seeds
    python sweep.py config/speedrun.py --grid "learning_rate=1e-3,2e-3 weight_decay=0,0.1" --seeds=2
    python sweep.py config/speedrun.py --scaling "n_layer,n_head,n_embd=2,2,128 4,4,256" --tokens=2000000
    python sweep.py config/speedrun.py --seeds=3 --nproc=2 --max_iters=200          # each run under torchrun
Every run is `python train.py CONFIGS... --key=value ...` in its own subprocess and out_dir
(sweep_out/NAME/runs/LABEL-seedS/), started in this directory as train.py would be; its output goes to train.log there. Any --key=value that is not one of
this script's own flags below goes to every run. A run that finished is not run again; one that stopped half
way resumes from its checkpoint; a failed run is reported and the others go on. Results: the runs' log.jsonl
files -> sweep_out/NAME/results.{json,md} and PNGs (loss curves with a +-std band, lr/dropout schedules, and
speed vs quality for a grid or the fitted power law for a scaling curve).
"""
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np

from configurator import die, save_json

ROOT = os.path.dirname(os.path.abspath(__file__))
OWN_FLAGS = dict(      # this script's flags; every other --key=value goes to train.py
    seeds=1,           # runs per cell, seeds seed, seed+1, ...
    seed=1337,         # the first seed (train.py's seed drives init, data order and dropout)
    grid='',           # "key=v1,v2 key2=w1,w2": every combination is a cell
    scaling='',        # "k1,k2=a1,b1 a2,b2 ...": one cell per point; reported against non-embedding params
    tokens=0,          # with --scaling (or alone): train every run on this many tokens (train.py max_tokens)
    nproc=1,           # > 1: each run under torchrun --standalone --nproc_per_node=K
    name='',           # sweep_out/NAME; default: the configs' names and the sweep's kind
    out='sweep_out',
    dry_run=False,     # print the runs and exit
)


def parse_args(argv):
    """argv -> (configs, own flags, train.py overrides). Values may follow their flag after a space."""
    configs, own, passthrough, args = [], dict(OWN_FLAGS), [], list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith('--'):
            if not arg.endswith('.py') or not os.path.isfile(arg):
                die(f"{arg!r} is not a config file: pass config/*.py files and --key=value flags")
            configs.append(arg)
            continue
        key, has_value, value = arg[2:].partition('=')
        if key not in own:
            passthrough.append(arg)
            continue
        if not has_value:
            if isinstance(OWN_FLAGS[key], bool):
                value = 'true'
            elif not args:
                die(f"--{key} needs a value")
            else:
                value = args.pop(0)
        kind = type(OWN_FLAGS[key])
        try:
            own[key] = value.lower() in ('1', 'true', 'yes') if kind is bool else kind(value)
        except ValueError:
            die(f"--{key}={value!r} is not a valid {kind.__name__}")
    for key in ('seeds', 'nproc'):
        if own[key] < 1:
            die(f"--{key}={own[key]} must be >= 1")
    if own['tokens'] < 0:
        die(f"--tokens={own['tokens']} must be >= 0")
    if own['grid'] and own['scaling']:
        die("--grid and --scaling exclude each other: one sweep varies one kind of thing")
    if any(a.split('=')[0] == '--out_dir' for a in passthrough):
        die("--out_dir is set per run by sweep.py (sweep_out/NAME/runs/...): use --out or --name")
    return configs, own, passthrough


def split_values(text):
    """'1e-3,2e-3' -> ['1e-3', '2e-3']; commas inside () or [] belong to the value: 'betas=(0.9,0.95),(0.8,0.9)'."""
    out, depth, cur = [], 0, ''
    for ch in text:
        depth += 1 if ch in '([' else -1 if ch in ')]' else 0
        if ch == ',' and depth == 0:
            out.append(cur)
            cur = ''
        else:
            cur += ch
    return [v.strip() for v in out + [cur]]


def grid_cells(grid):
    """'a=1,2 b=x,y' -> [{'a': '1', 'b': 'x'}, {'a': '1', 'b': 'y'}, ...] (every combination)."""
    axes = []
    for part in grid.split():
        key, eq, values = part.partition('=')
        values = split_values(values)
        if not eq or not key or not all(values):
            die(f"--grid: {part!r} is not key=v1,v2,...; e.g. --grid \"learning_rate=1e-3,2e-3 dropout=0,0.1\"")
        axes.append([(key, v) for v in values])
    return [dict(c) for c in itertools.product(*axes)]


def scaling_cells(scaling):
    """'n_layer,n_embd=2,128 4,256' -> [{'n_layer': '2', 'n_embd': '128'}, {'n_layer': '4', 'n_embd': '256'}]."""
    keys, eq, rest = scaling.partition('=')
    keys, points = [k.strip() for k in keys.split(',')], rest.split()
    if not eq or not all(keys) or not points:
        die(f"--scaling: {scaling!r} is not 'k1,k2=a1,b1 a2,b2 ...'; e.g. --scaling \"n_layer,n_embd=2,128 4,256\"")
    cells = []
    for p in points:
        values = split_values(p)
        if len(values) != len(keys) or not all(values):
            die(f"--scaling: point {p!r} has {len(values)} values for the {len(keys)} keys {','.join(keys)}")
        cells.append(dict(zip(keys, values)))
    return cells


def label_of(cell):
    return ','.join(f'{k}={v}' for k, v in cell.items()) or 'base'


def dir_name(label):
    return re.sub(r'[^A-Za-z0-9._=,-]+', '_', label).replace('=', '_').replace(',', '__')


def plan(configs, own, passthrough, sweep_dir):
    """Every run: its cell, seed, out_dir and train.py command."""
    cells = grid_cells(own['grid']) if own['grid'] else scaling_cells(own['scaling']) if own['scaling'] else [{}]
    budget = [f"--max_tokens={own['tokens']}", "--lr_decay_iters=0"] if own['tokens'] else []  # decay over the run
    launcher = [sys.executable] if own['nproc'] == 1 else \
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', f"--nproc_per_node={own['nproc']}"]
    runs = []
    for cell in cells:
        for s in range(own['seeds']):
            seed = own['seed'] + s
            out_dir = os.path.join(sweep_dir, 'runs', f"{dir_name(label_of(cell))}-seed{seed}")
            cmd = launcher + [os.path.join(ROOT, 'train.py'), *configs, *passthrough, *budget,
                              *[f'--{k}={v}' for k, v in cell.items()], f'--seed={seed}', f'--out_dir={out_dir}']
            runs.append(dict(cell=cell, label=label_of(cell), seed=seed, out_dir=out_dir, cmd=cmd))
    return runs


def read_log(out_dir):
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill
    return records


def recorded_args(run):
    """What a run was started with before (its train.py arguments and process count), or None."""
    path = os.path.join(run['out_dir'], 'command.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_args(run):
    cmd = run['cmd']
    i = next(k for k, a in enumerate(cmd) if a.endswith('train.py'))
    return dict(args=cmd[i + 1:], launcher=cmd[1:i])


def execute(run, i, n):
    """Run one train.py (or skip it when it finished before); returns its status dict, also saved as status.json."""
    status_path = os.path.join(run['out_dir'], 'status.json')
    if os.path.isfile(status_path):
        with open(status_path) as f:
            old = json.load(f)
        if old.get('returncode') == 0:
            print(f"[{i}/{n}] {run['label']} seed {run['seed']}: finished before, skipped")
            return old
    cmd = list(run['cmd'])
    if os.path.isfile(os.path.join(run['out_dir'], 'ckpt.pt')):  # stopped half way: continue it exactly
        cmd.append('--init_from=resume')
    os.makedirs(run['out_dir'], exist_ok=True)
    save_json(run_args(run), os.path.join(run['out_dir'], 'command.json'))
    print(f"[{i}/{n}] {run['label']} seed {run['seed']}: running (output in {run['out_dir']}/train.log)", flush=True)
    t0 = time.time()
    with open(os.path.join(run['out_dir'], 'train.log'), 'a') as log:
        log.write('$ ' + ' '.join(cmd) + '\n')
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'}).returncode  # train.log fills as it runs
    status = dict(returncode=rc, wall_s=time.time() - t0, cmd=cmd)
    if rc != 0:
        with open(os.path.join(run['out_dir'], 'train.log')) as f:
            tail = [ln.rstrip() for ln in f.readlines()[-3:]]
        status['error'] = next((ln for ln in reversed(tail) if 'error' in ln.lower()), tail[-1] if tail else '')
        print(f"[{i}/{n}]   FAILED (exit {rc}): {status['error']}", flush=True)
    else:
        evals = [r for r in read_log(run['out_dir']) if r.get('val_loss') is not None]
        last = f", val loss {evals[-1]['val_loss']:.4f}" if evals else ""
        print(f"[{i}/{n}]   done in {status['wall_s']:.0f} s{last}", flush=True)
    save_json(status, status_path)
    return status


def non_embedding_params(out_dir):
    """N of Kaplan et al. 2020: parameters without the token/position tables (the tied head too) and soft prompt,
    of the run's model built from its config.json on the meta device (no memory, no time)."""
    import torch
    from dataclasses import fields
    from model import GPT, GPTConfig
    with open(os.path.join(out_dir, 'config.json')) as f:
        cfg = json.load(f)
    with torch.device('meta'):
        model = GPT(GPTConfig(**{f.name: cfg[f.name] for f in fields(GPTConfig) if f.name in cfg}))
    tables = ('transformer.wte.', 'transformer.wpe.', 'lm_head.', 'transformer.soft_prompt')
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(tables))


def mean_std(xs):
    """Mean and sample std (n - 1; None for one run)."""
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else None


def summarize(runs, statuses):
    """One row per cell: final/best val loss over its seeds (mean, std, std as % of mean), bpb, speed, time."""
    rows = []
    for label in dict.fromkeys(r['label'] for r in runs):
        members = [(r, s) for r, s in zip(runs, statuses) if r['label'] == label]
        ok = [(r, read_log(r['out_dir'])) for r, s in members if s['returncode'] == 0]
        ok = [(r, log) for r, log in ok if any(x.get('val_loss') is not None for x in log)]
        row = dict(cell=members[0][0]['cell'], label=label, runs=len(members), ok=len(ok),
                   failed=[f"seed {r['seed']}: exit {s['returncode']}: {s.get('error', '')}"
                           for r, s in members if s['returncode'] != 0])
        if ok:
            evals = [[x for x in log if x.get('val_loss') is not None] for _, log in ok]
            final = [e[-1]['val_loss'] for e in evals]
            row['final_val'], row['final_val_std'] = mean_std(final)
            row['best_val'], row['best_val_std'] = mean_std([min(x['val_loss'] for x in e) for e in evals])
            row['std_pct'] = None if row['final_val_std'] is None else 100 * row['final_val_std'] / row['final_val']
            bpb = [e[-1].get('val_bpb') for e in evals]
            row['final_bpb'] = mean_std(bpb)[0] if all(b is not None for b in bpb) else None
            row['iters'] = evals[0][-1]['iter']
            speeds = [x['tok_s'] for _, log in ok for x in log if x.get('tok_s')]
            row['tok_s'] = float(np.median(speeds)) if speeds else None
            row['wall_s'] = mean_std([s['wall_s'] for r, s in members if s['returncode'] == 0])[0]
            row['params'] = non_embedding_params(ok[0][0]['out_dir'])
            row['seeds'] = [r['seed'] for r, _ in ok]
            row['final_vals'] = final
        rows.append(row)
    return rows


def fit_power_law(n, loss):
    """L(N) = a * N^-b + c (REFERENCE §18): for each c on a grid below min(L), a line through
    log(L - c) vs log N; the c with the smallest squared error in L wins. Returns (a, b, c)."""
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    best = None
    for c in np.linspace(0, loss.min() * 0.999, 500):
        slope, intercept = np.polyfit(np.log(n), np.log(loss - c), 1)
        a, b = math.exp(intercept), -slope
        err = float(((a * n ** -b + c - loss) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, a, b, float(c))
    return best[1:]


def fmt(x, spec='.4f'):
    return '-' if x is None else format(x, spec)


def to_markdown(title, rows, kind, fit):
    md = [f'# {title}', '', f"{sum(r['ok'] for r in rows)} of {sum(r['runs'] for r in rows)} runs finished. "
          'Val loss: mean +- sample std over the seeds of a cell at the last eval; best: the lowest eval of each run. '
          'Params: without the token and position tables (Kaplan et al.).', '',
          '| cell | params (non-emb.) | seeds | final val loss | std % of mean | best val loss | val bpb | iters | tok/s | wall s |',
          '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if not r['ok']:
            md.append(f"| {r['label']} | - | 0/{r['runs']} | failed | - | - | - | - | - | - |")
            continue
        pm = lambda m, s: f"{m:.4f}" + ('' if s is None else f" +- {s:.4f}")
        md.append(f"| {r['label']} | {r['params']:,} | {r['ok']}/{r['runs']} | {pm(r['final_val'], r['final_val_std'])} | "
                  f"{fmt(r['std_pct'], '.2f')}{'%' if r['std_pct'] is not None else ''} | "
                  f"{pm(r['best_val'], r['best_val_std'])} | {fmt(r['final_bpb'])} | {r['iters']} | "
                  f"{fmt(r['tok_s'], ',.0f')} | {r['wall_s']:.0f} |")
    failed = [f"- {r['label']} {f}" for r in rows for f in r['failed']]
    if failed:
        md += ['', 'Failed runs (their train.log has the whole output):', *failed]
    if fit:
        a, b, c = fit
        md += ['', f'Fit over the cells: L(N) = {a:.4g} * N^-{b:.4f} + {c:.4f} (N = non-embedding parameters).']
    plots = ['loss_curves.png', 'schedules.png'] + (['scaling.png'] if kind == 'scaling' else
                                                    ['pareto.png'] if kind == 'grid' else [])
    md += ['', *[f'![{p[:-4]}]({p})' for p in plots]]
    return '\n'.join(md) + '\n'


def make_plots(runs, rows, kind, fit, sweep_dir):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(sweep_dir, name), dpi=120)
        plt.close(fig)

    logs = {}  # label -> [log records of each finished run]
    for r in runs:
        log = read_log(r['out_dir'])
        if log:
            logs.setdefault(r['label'], []).append(log)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for n, (label, group) in enumerate(logs.items()):
        for key, style in (('train_loss', '--'), ('val_loss', '-')):
            per_run = [{x['iter']: x[key] for x in log if x.get(key) is not None} for log in group]
            iters = sorted(set.intersection(*(set(p) for p in per_run)))
            if not iters:
                continue
            vals = np.array([[p[i] for i in iters] for p in per_run])
            mean, std = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(iters))
            ax.plot(iters, mean, style, color=f'C{n % 10}', label=f'{label} {key} ({len(vals)} seeds)')
            ax.fill_between(iters, mean - std, mean + std, color=f'C{n % 10}', alpha=0.2)
    ax.set(xlabel='iteration', ylabel='loss', title='loss (mean +- std over seeds)')
    ax.legend(fontsize=6)
    save(fig, 'loss_curves.png')

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for n, (label, group) in enumerate(logs.items()):  # the schedules are the same for every seed of a cell
        steps = [x for x in group[0] if x.get('lr') is not None]
        ax1.plot([x['iter'] for x in steps], [x['lr'] for x in steps], color=f'C{n % 10}', label=label)
        ax2.plot([x['iter'] for x in steps], [x.get('dropout') or 0 for x in steps], color=f'C{n % 10}', label=label)
    ax1.set(xlabel='iteration', ylabel='learning rate', title='learning rate schedule')
    ax2.set(xlabel='iteration', ylabel='dropout', title='dropout schedule')
    ax1.legend(fontsize=6)
    save(fig, 'schedules.png')

    done = [r for r in rows if r['ok']]
    if kind == 'scaling' and done:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        n = np.array([r['params'] for r in done], dtype=float)
        ax.errorbar(n, [r['final_val'] for r in done], yerr=[r['final_val_std'] or 0 for r in done], fmt='o', label='runs')
        if fit:
            a, b, c = fit
            grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
            ax.plot(grid, a * grid ** -b + c, '-', label=f'{a:.3g} N^-{b:.3f} + {c:.3f}')
        ax.set(xscale='log', yscale='log', xlabel='non-embedding parameters N', ylabel='final val loss',
               title='scaling: val loss vs model size')
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 5.40, not 5.4 x 10^0
            axis(matplotlib.ticker.FormatStrFormatter('%.2f'))
        ax.legend(fontsize=7)
        save(fig, 'scaling.png')
    if kind == 'grid' and done:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for r in done:
            ax.errorbar(r['tok_s'] or 0, r['final_val'], yerr=r['final_val_std'] or 0, fmt='o')
            ax.annotate(r['label'], (r['tok_s'] or 0, r['final_val']), fontsize=6)
        ax.set(xlabel='training tokens/s (median)', ylabel='final val loss', title='speed vs quality')
        save(fig, 'pareto.png')


def main(argv=None):
    configs, own, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
    kind = 'grid' if own['grid'] else 'scaling' if own['scaling'] else 'seeds'
    name = own['name'] or '+'.join(os.path.splitext(os.path.basename(c))[0] for c in configs or ['train']) + f'-{kind}'
    sweep_dir = os.path.join(own['out'], dir_name(name))
    runs = plan(configs, own, passthrough, sweep_dir)
    if own['dry_run']:
        for r in runs:
            print(' '.join(r['cmd']))
        return 0
    for r in runs:  # a finished or half-done run is reused only for the very same command
        old = recorded_args(r)
        if old is not None and old != run_args(r):
            die(f"{r['out_dir']} was run with other arguments ({' '.join(old['args'])}); give this sweep another "
                f"--name, or delete {sweep_dir} to start it again")
    os.makedirs(sweep_dir, exist_ok=True)
    print(f"sweep {name}: {len(runs)} run(s) ({kind}) -> {sweep_dir}", flush=True)
    t0 = time.time()
    try:
        statuses = [execute(r, i + 1, len(runs)) for i, r in enumerate(runs)]
    except KeyboardInterrupt:
        print(f"\nsweep interrupted: run the same command again to continue (finished runs are kept)", file=sys.stderr)
        return 130
    rows = summarize(runs, statuses)
    if kind == 'grid':
        rows.sort(key=lambda r: (not r['ok'], r.get('final_val', 0)))
    fit = None
    if kind == 'scaling' and sum(1 for r in rows if r['ok']) >= 3:
        fit = fit_power_law([r['params'] for r in rows if r['ok']], [r['final_val'] for r in rows if r['ok']])
    save_json(dict(name=name, kind=kind, configs=configs, flags=own, overrides=passthrough, rows=rows,
                   power_law=dict(zip('abc', fit)) if fit else None, wall_s=time.time() - t0),
              os.path.join(sweep_dir, 'results.json'))
    md = to_markdown(f'sweep {name}', rows, kind, fit)
    with open(os.path.join(sweep_dir, 'results.md.tmp'), 'w') as f:
        f.write(md)
    os.replace(os.path.join(sweep_dir, 'results.md.tmp'), os.path.join(sweep_dir, 'results.md'))
    make_plots(runs, rows, kind, fit, sweep_dir)
    print(md)
    print(f"wrote {sweep_dir}/results.json, results.md and plots in {time.time() - t0:.0f} s")
    return 1 if any(s['returncode'] != 0 for s in statuses) else 0


if __name__ == '__main__':
    sys.exit(main())
