"""The study summary of RESULTS.md (cells over seeds, floors, owed cells) and its figures, rebuilt from
results/runs/ alone (figures need matplotlib, which nothing else needs: pip install matplotlib).

    python results/plots.py tables                 # markdown: the study's cells (mean +/- std over seeds), floors, what is owed
    python results/plots.py figures                # results/knn_vs_time_<data>.png: k-NN against training time per method,
                                                   # results/detection_auroc_<method>_<data>.png: AUROC over training, ablations
                                                   # results/probe_vs_auroc_<data>.png: probe against final AUROC, per run
                                                   # results/co_byol_<study>_<data>.png: CO-BYOL's receptive-field and crop studies
    python results/plots.py collect OUT_DIR NAME --stdout FILE --command "..." [--eval FILE] [--note "..."]
    python results/plots.py robustness EVAL_JSON... --labels A A B B -o results/robustness.png  # same label: seeds pooled

A run is a folder results/runs/NAME/ with log.jsonl (the run's own log) and run.json (command, machine,
wall time, the printed `config:`); `collect` makes one from a finished --out-dir and its saved stdout.
Runs of the same data whose configurations differ only in --seed (and in flags that do not change
training: paths, workers, logging) form one cell of the summary table. Training time is steps x the
bench.py step time where run.json has "bench_step_ms", else summed from the logged images/s (evaluation
and checkpoints left out, as the scripts measure it). The other tables of RESULTS.md (detection
ablation, evaluations, speed) are made by the commands RESULTS.md gives with them.
A run.json with "shared": true ran beside other jobs (its times are marked, not timings); one with
"superseded" (why) is listed but kept out of the cells (e.g. made on an earlier data generator); one with
"ablation" (what it varies) has its own row, labelled with the arm's flags that differ (p, drop, lambda),
and fills no cell of the design.
"""
import argparse
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import numpy as np

RUNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'runs')
SEEDS_WANTED = 3
# flags that do not change what is trained: runs differing only in these (and the seed) share a cell
NOT_TRAINING = {'seed', 'out_dir', 'workers', 'log_every', 'eval_every', 'ckpt_every', 'print_config', 'dtype_reason',
                'device', 'dist_timeout', 'skip_bad_images', 'data_path', 'download', 'compile', 'dtype',
                'steps_per_epoch', 'total_steps'}  # the last two: derived from epochs, data and batch, in some runs' config
SHORT = {'dilemma_prob': 'p', 'drop_ratio': 'drop', 'dilemma_weight': 'lambda'}
CO_BYOL_SHORT = {'arch': 'arch', 'crop_min': 'crop-min'}  # co_byol.py's studies: receptive field, smallest crop
ARM_FLAGS = {'dilemma_prob', 'drop_ratio', 'dilemma_weight', 'epochs', 'local_weight'}  # what an arm of a pair changes
# the study's design: (script, method, data) x arms, each wanted with SEEDS_WANTED seeds
DILEMMA_METHODS, STUDY_DATA = ('mocov3', 'dino', 'simclr', 'mae'), ('shapes', 'cifar10-45k')
DILEMMA_ARMS, CO_BYOL_ARMS = ('baseline', '+ DILEMMA, equal epochs', '+ DILEMMA, equal time'), ('BYOL', 'CO-BYOL')
# the third arm, sparse inputs without the detection task (drop > 0, p = 0), wanted at equal epochs for these
SPARSITY_METHODS, SPARSITY_ARM = ('mocov3', 'dino'), '+ sparsity, equal epochs'
# CO-BYOL's two studies on shapes, both arms: four receptive fields (presets) and the paper's smallest crop scales
RF_STUDY, CROP_STUDY = ('rf17_small', 'rf25_small', 'rf49_small', 'resnet50_small'), (0.08, 0.2, 0.5)


def load_runs(root=RUNS):
    """Every results/runs/NAME with run.json and log.jsonl: dict(name, meta, config, log, evals, eval)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(root, '*', 'run.json'))):
        folder = os.path.dirname(path)
        meta = json.load(open(path))
        if not os.path.exists(os.path.join(folder, 'log.jsonl')) or not isinstance(meta.get('config'), dict):
            continue
        records = [json.loads(line) for line in open(os.path.join(folder, 'log.jsonl')) if line.strip()]
        eval_path = os.path.join(folder, 'eval.json')
        runs.append(dict(name=os.path.basename(folder), meta=meta, config=meta['config'],
                         log=[r for r in records if 'loss' in r], evals=[r for r in records if 'knn_top1' in r],
                         eval=json.load(open(eval_path))['results'] if os.path.exists(eval_path) else None))
    return runs


def training_seconds(run):
    """(steps, seconds): training time at each logged step. With "bench_step_ms" in run.json (a step time
    measured by bench.py for the run's configuration, all arms in one bench run), steps x that time: the
    time an unshared machine takes. Otherwise from the logged images/s (evaluation excluded)."""
    if run['meta'].get('bench_step_ms'):
        steps = [0] + [r['step'] for r in run['log']]
        return steps, [s * run['meta']['bench_step_ms'] / 1000 for s in steps]
    batch, seconds, last, steps, times = run['config']['batch_size'], 0.0, 0, [0], [0.0]
    for r in run['log']:
        seconds += (r['step'] - last) * batch / r['images_per_s']
        last = r['step']
        steps.append(last)
        times.append(seconds)
    return steps, times


def describe(config):
    """(script method, data, arm) of a run's configuration."""
    data = os.path.basename(os.path.normpath(config['data_path'])) if config['data'] == 'folder' else config['data']
    if 'arch' in config:  # co_byol.py
        return 'co_byol', data, 'CO-BYOL' if config['local_weight'] > 0 else 'BYOL'
    if config['dilemma_prob'] > 0 and config['dilemma_weight'] > 0:
        arm = '+ DILEMMA'
    else:
        arm = '+ sparsity' if config['drop_ratio'] > 0 and config['method'] != 'mae' else 'baseline'
    return config['method'], data, arm


def cells(runs):
    """{(method, data): [cell, ...]}: runs grouped by configuration (seeds pooled), each arm labelled."""
    groups = {}
    for run in runs:
        if run['meta'].get('superseded'):
            continue
        key = json.dumps([describe(run['config'])[1], {k: v for k, v in sorted(run['config'].items()) if k not in NOT_TRAINING}])
        groups.setdefault(key, []).append(run)
    table = {}
    for members in groups.values():
        method, data, arm = describe(members[0]['config'])
        table.setdefault((method, data), []).append(dict(arm=arm, runs=members, config=members[0]['config']))
    for row in table.values():
        for c in row:  # flags besides the arm's own, where no cell of another arm shares them (an ablation)
            others = [o for o in row if o['arm'] != c['arm']]
            diffs = [other_flags(c['config'], o['config']) for o in others]
            # named against the nearest cell of the other arm: a design cell before an ablation, then the
            # fewest differing flags, then their names (so the label does not depend on the load order)
            nearest = min(zip(diffs, others), key=lambda d_o: (is_ablation(d_o[1]), len(d_o[0]), sorted(d_o[0])),
                          default=({}, None))[0]
            extra = {} if not diffs or not all(diffs) else nearest
            short = CO_BYOL_SHORT if 'arch' in c['config'] else SHORT
            c['head'], c['flags'] = c['arm'], [(k, f'{short.get(k, k)}={flag_value(v)}') for k, v in extra.items()]
            c['label'] = with_flags(c, short)
        for c in row:  # equal epochs / equal time, against the baseline that differs only in the arm's flags
            base = [b for b in row if b['arm'] == 'baseline' and not other_flags(c['config'], b['config'])
                    and not is_ablation(b)]  # an ablation is no reference
            c['fills'] = [c['label']]  # the arms of the design this cell counts for
            if c['arm'] in ('+ DILEMMA', '+ sparsity') and len(base) == 1:
                c['head'] = c['label'] = c['arm'] + ', ' + pairing(c, base[0])
                c['flags'] = []  # none: the pair differs only in the arm's flags
                kinds = c['label'].split(', ')[1].split(' = ')  # 'equal epochs = equal time' counts for both
                c['fills'] = [f"{c['arm']}, {kind}" for kind in kinds]
        for c in row:  # cells of one arm that differ in its own flags (p, drop, lambda; arch, crop-min): name them
            short = CO_BYOL_SHORT if 'arch' in c['config'] else SHORT
            varying = [k for k in short if k not in dict(c['flags'])
                       and len({o['config'].get(k) for o in row if o['arm'] == c['arm']}) > 1]
            if varying:
                c['flags'] += [(k, f"{short[k]}={flag_value(c['config'][k])}") for k in varying]
                c['label'] = with_flags(c, short)
            if is_ablation(c):
                c['fills'] = []
        row.sort(key=lambda c: (c['label'], c['config']['epochs']))
    return table


def with_flags(cell, short):
    """'CO-BYOL (local_grid=4, arch=rf17_small)': the head, then the cell's flags in one parenthesis, in a fixed
    order whichever pass of cells() named them (other flags first, then the study's own in `short`'s order)."""
    order = list(short)
    flags = sorted(cell['flags'], key=lambda kv: (kv[0] in short, order.index(kv[0]) if kv[0] in short else kv[0]))
    return cell['head'] + (f" ({', '.join(text for _, text in flags)})" if flags else '')


def is_ablation(cell):
    return any(r['meta'].get('ablation') for r in cell['runs'])  # run.json says why: not a cell of the design


def flag_value(value):
    return value if isinstance(value, str) else f'{value:g}'


def other_flags(config, reference):
    return {k: v for k, v in config.items() if k not in NOT_TRAINING | ARM_FLAGS and reference.get(k) != v}


def pairing(cell, base):
    """'equal epochs', 'equal time' (training times within 5%, from the bench step times) or 'E epochs'.
    'equal epochs = equal time' where every run of both cells says in run.json ("equal_time", why) that the
    arms' steps cost the same: MAE, whose DILEMMA step does the same FLOPs and whose measured step-time
    ratio is within its timing noise, so one pair of runs fills both arms."""
    if abs(cell['config']['epochs'] - base['config']['epochs']) < 1e-9:
        same_cost = all(r['meta'].get('equal_time') for r in cell['runs'] + base['runs'])
        return 'equal epochs = equal time' if same_cost else 'equal epochs'
    times = [np.mean([training_seconds(r)[1][-1] for r in c['runs']]) for c in (cell, base)]
    timed = all(r['meta'].get('bench_step_ms') for r in cell['runs'] + base['runs'])
    return 'equal time' if timed and abs(times[0] / times[1] - 1) < 0.05 else f"{cell['config']['epochs']:g} epochs"


def mean_std(values, digits=2):
    values = [v for v in values if v is not None]
    if not values:
        return '-'
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return f'{np.mean(values):.{digits}f} +/- {np.std(values, ddof=1):.{digits}f}'


def time_kind(runs):
    with_bench = [bool(r['meta'].get('bench_step_ms')) for r in runs]
    if all(with_bench):
        return ' (steps x bench step time)'
    logged = 'logged, shared machine: not a timing' if any(r['meta'].get('shared') for r in runs) else 'logged'
    return f' (steps x bench step time, else {logged})' if any(with_bench) else f' ({logged})'


def print_tables(runs, root=RUNS):
    table = cells(runs)
    print('| method | data | arm | epochs (steps) | seeds | k-NN top-1 | probe top-1 | detection AUROC (last log) | '
          'training time (min) | runs |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for (method, data), row in sorted(table.items()):
        for c in row:
            rs = c['runs']
            auroc = [r['log'][-1].get('det_auroc') for r in rs]
            print(f"| {method} | {data} | {c['label']} | {c['config']['epochs']:g} ({rs[0]['log'][-1]['step']}) | "
                  f"{len(rs)} ({', '.join(str(r['config']['seed']) for r in rs)}) | "
                  f"{mean_std([r['evals'][-1]['knn_top1'] if r['evals'] else None for r in rs])} | "
                  f"{mean_std([(r['eval'] or {}).get('probe_top1') for r in rs])} | "
                  f"{mean_std(auroc, 3)} | {mean_std([training_seconds(r)[1][-1] / 60 for r in rs], 1)}"
                  f"{time_kind(rs)} | "
                  f"{', '.join(r['name'] for r in rs)} |")
    print('\nRandom-init floors (`eval_linear.py --random-init`):\n')
    print('| file | model | data | k-NN top-1 | probe top-1 |\n|---|---|---|---|---|')
    for path in sorted(glob.glob(os.path.join(root, 'random_init_floors', '*.eval.json'))):
        r = json.load(open(path))
        s = r['settings']
        data = os.path.basename(os.path.normpath(s['data_path'])) if s['data'] == 'folder' else s['data']
        a = s.get('backbone_args') or {}
        model = (f"ViT {a.get('embed_dim')}-d, {a.get('depth')} blocks, patch {a.get('patch_size')}, {a.get('pos_embed')}"
                 if s.get('kind', 'vit') == 'vit' and a else s.get('model')) if not s.get('arch') else f"{s['arch']} x {s['width']}"
        print(f"| {os.path.basename(path)} | {model} | {data} | {mean_std([r['results']['knn_top1']])} | "
              f"{mean_std([r['results'].get('probe_top1')])} |")
    superseded = [r for r in runs if r['meta'].get('superseded')]
    if superseded:
        print('\nKept out of the cells: ' + '; '.join(f"`{r['name']}` ({r['meta']['superseded']})" for r in superseded))
    print('\nStill owed (cells of the design, and of CO-BYOL\'s two studies, with fewer than %d seeds):\n' % SEEDS_WANTED)
    wanted = [(m, d, a) for m in DILEMMA_METHODS for d in STUDY_DATA for a in DILEMMA_ARMS]
    wanted += [(m, d, SPARSITY_ARM) for m in SPARSITY_METHODS for d in STUDY_DATA]
    wanted += [('co_byol', d, a) for d in STUDY_DATA for a in CO_BYOL_ARMS]
    for method, data, arm in wanted:  # the seeds of the best-filled cell that counts for this arm
        have = max([len({r['config']['seed'] for r in c['runs']}) for c in table.get((method, data), [])
                    if arm in c['fills']] or [0])
        if have < SEEDS_WANTED:
            print(f'- {method} on {data}, {arm}: {have} of {SEEDS_WANTED} seeds')
    row = table.get(('co_byol', 'shapes'), [])
    for flag, values, study in (('arch', RF_STUDY, 'receptive-field'), ('crop_min', CROP_STUDY, 'crop-scale')):
        for value, arm in [(v, a) for v in values for a in CO_BYOL_ARMS]:
            have = max([len({r['config']['seed'] for r in c['runs']}) for c in row if c['arm'] == arm
                        and c['config'].get(flag) == value and in_study(c, row, {flag})] or [0])
            if have < SEEDS_WANTED:
                print(f"- co_byol on shapes, {arm} at --{flag.replace('_', '-')} {flag_value(value)} "
                      f'({study} study): {have} of {SEEDS_WANTED} seeds')


def figures(runs, out_dir):
    """One PNG per dataset: a panel per method, k-NN against training time, one line per run of the design."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    table = {key: design_cells(row) for key, row in cells(runs).items()}
    labels = sorted({c['label'] for row in table.values() for c in row})
    # tab20's ten dark colours (matplotlib's default cycle) first, then their light twins: neighbouring
    # arms never get a dark/light pair of the same hue while there are at most ten
    palette = [plt.cm.tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
    colour = {label: palette[i % len(palette)] for i, label in enumerate(labels)}  # one colour per arm in every panel
    for data in sorted({d for _, d in table}):
        methods = sorted(m for m, d in table if d == data)
        n_labels = max(len(table[(m, data)]) for m in methods)  # legends go below the panels, never over the lines
        fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4 + 0.14 * n_labels), squeeze=False)
        for ax, method in zip(axes[0], methods):
            for c in table[(method, data)]:
                for j, run in enumerate(c['runs']):
                    steps, times = training_seconds(run)
                    x = np.interp([e['step'] for e in run['evals']], steps, times) / 60
                    ax.plot(x, [e['knn_top1'] for e in run['evals']], marker='o', color=colour[c['label']], alpha=0.8,
                            label=f"{c['label']} ({c['config']['epochs']:g} ep)" if j == 0 else None)
            ax.set_title(f'{method} on {data}')
            ax.set_xlabel('training time (min)' + time_kind([r for c in table[(method, data)] for r in c['runs']]),
                          fontsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc='upper center', bbox_to_anchor=(0.5, -0.2))
        axes[0][0].set_ylabel('k-NN top-1 (%), one line per seed')
        save(fig, os.path.join(out_dir, f'knn_vs_time_{data}.png'))
    ablation_figures(runs, out_dir, plt)
    probe_figures(runs, out_dir, plt)
    co_byol_study_figures(runs, out_dir, plt)


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches='tight')
    print('wrote', path)


def design_cells(row):
    """The cells of one (method, data) row that the k-NN-against-time figure draws: the study's arms, not
    the ablations (run.json "ablation"), which the tables list and the detection-AUROC figure draws."""
    return [c for c in row if not is_ablation(c)]


def ablation_panels(runs):
    """{(method, data): {flag: [(label, runs), ...]}}: for each method whose + DILEMMA arm has ablation runs,
    one panel per flag they vary (p, drop, lambda), holding the design's runs at the same epochs first and
    then each ablation varying that flag, in the flag's order: the detection-AUROC figure's lines."""
    panels = {}
    for (method, data), row in cells(runs).items():
        design = [c for c in row if c['arm'] == '+ DILEMMA' and c['fills']]
        if not design:  # co_byol.py's rows, or a method without the design's DILEMMA run
            continue
        for c in sorted(row, key=lambda c: [c['config'][k] for k in SHORT]):
            ref = [d for d in design if d['config']['epochs'] == c['config']['epochs']]
            if c['fills'] or c['arm'] != '+ DILEMMA' or not ref:  # a lambda = 0 ablation has no detection head
                continue
            for k in [k for k in SHORT if c['config'][k] != ref[0]['config'][k]]:
                design_line = (f"design ({SHORT[k]}={ref[0]['config'][k]:g})", ref[0]['runs'])
                panel = panels.setdefault((method, data), {}).setdefault(SHORT[k], [design_line])
                panel.append((f"{SHORT[k]}={c['config'][k]:g}", c['runs']))
    return panels


def ablation_figures(runs, out_dir, plt):
    """results/detection_auroc_<method>_<data>.png: detection AUROC on the training batches over training,
    a panel per ablated flag, one line per run (the design's seeds in black)."""
    for (method, data), panels in sorted(ablation_panels(runs).items()):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (flag, lines) in zip(axes[0], sorted(panels.items(), key=lambda kv: list(SHORT.values()).index(kv[0]))):
            for i, (label, members) in enumerate(lines):
                for j, run in enumerate(members):
                    log = [r for r in run['log'] if 'det_auroc' in r]
                    ax.plot([r['step'] for r in log], [r['det_auroc'] for r in log], lw=1, alpha=0.8,
                            color='black' if i == 0 else plt.cm.tab10(i - 1),
                            label=f'{label}, {len(members)} seed{"s" * (len(members) > 1)}' if j == 0 else None)
            ax.axhline(0.5, color='grey', ls=':', lw=1)
            ax.set_title(f'{method} + DILEMMA on {data}: {flag}')
            ax.set_xlabel(f"training step ({members[0]['config']['epochs']:g} epochs)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc='lower right')
        axes[0][0].set_ylabel('detection AUROC (training batches)')
        save(fig, os.path.join(out_dir, f'detection_auroc_{method}_{data}.png'))


def probe_against_auroc(runs):
    """{(method, data): (points, baselines)}: each + DILEMMA run with a probe (eval.json) as a point (label,
    detection AUROC at its last log, probe top-1, name), and each cell without detection (baseline, +
    sparsity) as (label, mean probe): does the probe follow how far detection learned?"""
    def probe(run):
        return run['eval'].get('probe_top1') if run['eval'] else None
    out = {}
    for (method, data), row in cells(runs).items():
        points = []
        for c in [c for c in row if c['arm'] == '+ DILEMMA']:
            for run in c['runs']:
                aurocs = [r['det_auroc'] for r in run['log'] if 'det_auroc' in r]
                if aurocs and probe(run) is not None:
                    points.append((c['label'], aurocs[-1], probe(run), run['name']))
        baselines = [(c['label'], float(np.mean(probes))) for c in row if c['arm'] != '+ DILEMMA'
                     for probes in [[probe(r) for r in c['runs'] if probe(r) is not None]] if probes]
        if points:
            out[(method, data)] = (points, baselines)
    return out


def probe_figures(runs, out_dir, plt):
    """results/probe_vs_auroc_<data>.png: a panel per method, probe top-1 against the detection AUROC at the
    end of training, one point per + DILEMMA run; the arms without detection as dashed lines (mean probe)."""
    per_method = probe_against_auroc(runs)
    for data in sorted({d for _, d in per_method}):
        panels = sorted((m, v) for (m, d), v in per_method.items() if d == data)
        n_entries = max(len({p[0] for p in points}) + len(baselines) for _, (points, baselines) in panels)
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4 + 0.14 * n_entries), squeeze=False)
        for ax, (method, (points, baselines)) in zip(axes[0], panels):
            labels = sorted({p[0] for p in points})
            for i, label in enumerate(labels):
                mine = [p for p in points if p[0] == label]
                ax.scatter([p[1] for p in mine], [p[2] for p in mine], color=plt.cm.tab10(i % 10), s=25,
                           label=f'{label}, {len(mine)} run{"s" * (len(mine) > 1)}')
            for j, (label, probe) in enumerate(baselines):
                ax.axhline(probe, color='grey', ls=('--', ':', '-.')[j % 3], lw=1, label=f'{label} (mean)')
            ax.set_title(f'{method} on {data}')
            ax.set_xlabel('detection AUROC, last log (training batches)', fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc='upper center', bbox_to_anchor=(0.5, -0.16))
        axes[0][0].set_ylabel('linear probe top-1 (%), one point per run')
        save(fig, os.path.join(out_dir, f'probe_vs_auroc_{data}.png'))


def in_study(cell, row, flags):
    """Whether a CO-BYOL cell differs from its own arm's cell of the design (at the row's longest schedule)
    in `flags` only, over both configurations' flags (one lacking a flag differs)."""
    longest = max([c['config']['epochs'] for c in row if c['fills']], default=None)  # not a shorter pair's cells
    return any({k for k in set(cell['config']) | set(ref['config']) if k not in NOT_TRAINING
                and cell['config'].get(k) != ref['config'].get(k)} <= flags
               for ref in row if ref['fills'] and ref['arm'] == cell['arm'] and ref['config']['epochs'] == longest)


def co_byol_studies(runs):
    """{(data, study): (points, ticks)}, CO-BYOL's two studies as the paper draws them. 'receptive_field': x
    is the network's RF in px (rf_resnet.receptive_field of --arch), every other flag as in a cell of the
    design at its longest schedule (the default network's, at crop-min 0.2); 'crop_min': x is the smallest
    crop scale, on the default network. Series: BYOL, CO-BYOL, and CO-BYOL with its map pooled to
    n x n locals (--local-grid n). points: {series: {x: [(k-NN, probe or None, name), ...]}}, k-NN the log's
    last; ticks: {x: label}, the RF with its preset and the side of its map. A study with fewer than two x
    values is left out."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import rf_resnet  # imports torch: only here
    x_of = {'receptive_field': lambda cfg: rf_resnet.receptive_field(rf_resnet.preset_args(cfg['arch'])),
            'crop_min': lambda cfg: cfg['crop_min']}
    varies = {'receptive_field': {'arch', 'local_grid'}, 'crop_min': {'crop_min'}}
    out = {}
    for (method, data), row in cells(runs).items():
        if method != 'co_byol':
            continue
        for study, allowed in varies.items():
            points, ticks = {}, {}
            for c in [c for c in row if in_study(c, row, allowed)]:
                grid = c['config'].get('local_grid')
                series = c['arm'] + (f', {grid} x {grid} locals' if grid else '')
                x, side = x_of[study](c['config']), rf_resnet.feature_size(
                    rf_resnet.preset_args(c['config']['arch']), c['config']['img_size'])
                ticks[x] = f"{x}\n{c['config']['arch']}\n{side} x {side} map" if study == 'receptive_field' else f'{x:g}'
                points.setdefault(series, {}).setdefault(x, []).extend(
                    (r['evals'][-1]['knn_top1'] if r['evals'] else None, (r['eval'] or {}).get('probe_top1'), r['name'])
                    for r in c['runs'])
            if len(ticks) > 1:
                out[(data, study)] = points, ticks
    return out


def seeds_per_point(counts):
    """Legend text saying how many seeds stand behind each point; counts: {x: number of seeds}."""
    if len(set(counts.values())) == 1:
        n = next(iter(counts.values()))
        return f'{n} seed{"s" if n > 1 else ""} at each'
    return 'seeds: ' + ', '.join(f'{n} at {x:g}' for x, n in sorted(counts.items()))


def co_byol_study_figures(runs, out_dir, plt):
    """results/co_byol_<study>_<data>.png: k-NN and probe top-1 against the receptive field (log axis) or
    the smallest crop scale, a dot per seed and the mean +/- std per series joined by a line."""
    axis = {'receptive_field': 'receptive field of one local representation (px, log scale)',
            'crop_min': 'smallest random-resized-crop scale of the two views'}
    studies = co_byol_studies(runs)
    colour = {s: plt.cm.tab10(i % 10) for i, s in enumerate(sorted({s for p, _ in studies.values() for s in p}))}
    for (data, study), (points, ticks) in sorted(studies.items()):
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.9 + 0.14 * len(points)))
        for ax, (i, name) in zip(axes, [(0, 'k-NN top-1 (%), end of training'), (1, 'linear probe top-1 (%)')]):
            for j, (series, by_x) in enumerate(sorted(points.items())):
                xs = sorted(by_x)
                offset = j - (len(points) - 1) / 2  # series side by side around each tick
                shift = 1 + 0.025 * offset if study == 'receptive_field' else 0.006 * offset
                place = (lambda x: x * shift) if study == 'receptive_field' else (lambda x: x + shift)
                values = {x: [p[i] for p in by_x[x] if p[i] is not None] for x in xs}
                xs = [x for x in xs if values[x]]
                ax.scatter([place(x) for x in xs for _ in values[x]], [v for x in xs for v in values[x]],
                           color=colour[series], s=12, alpha=0.5)
                ax.errorbar([place(x) for x in xs], [np.mean(values[x]) for x in xs],
                            yerr=[np.std(values[x], ddof=1) if len(values[x]) > 1 else 0 for x in xs],
                            color=colour[series], marker='o', capsize=3,
                            label=f'{series} ({seeds_per_point({x: len(values[x]) for x in xs})})')
            if study == 'receptive_field':
                ax.set_xscale('log')
                ax.minorticks_off()
            ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)], fontsize=7)
            ax.set_xlabel(axis[study], fontsize=8)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc='upper center', bbox_to_anchor=(0.5, -0.3 if study == 'receptive_field' else -0.16))
        fig.suptitle(f'CO-BYOL and BYOL on {data}: {study.replace("_", " ")} study', fontsize=10)
        save(fig, os.path.join(out_dir, f'co_byol_{study}_{data}.png'))


def eval_result(path):
    """The last JSON line of eval_linear.py's output (progress lines precede it, a `time` report may follow)."""
    json_lines = [l for l in open(path).read().splitlines() if l.startswith('{')]
    if not json_lines:
        sys.exit(f'error: {path} has no JSON line; did eval_linear.py finish?')
    return json.loads(json_lines[-1])


def robustness(files, labels, out):
    """Probe top-1 under each corruption: files with the same label (seeds) pool into mean +/- std.
    Prints the markdown table and, unless out is None, writes the figure (mean, error bar = sample std)."""
    results = {}
    for f, label in zip(files, labels):
        results.setdefault(label, []).append(eval_result(f)['results']['robustness'])
    first = next(iter(results.values()))[0]
    kinds = list(first)
    print('| method (seeds) | ' + ' | '.join(f"{k} {' / '.join(first[k])}" for k in kinds) + ' |')
    print('|---' * (len(kinds) + 1) + '|')
    for label, runs in results.items():
        cells = [' / '.join(mean_std([r[k][s] for r in runs], 1) for s in first[k]) for k in kinds]
        print(f'| {label} ({len(runs)}) | ' + ' | '.join(cells) + ' |')
    if out is None:
        return
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.2), sharey=True)
    for ax, kind in zip(axes, kinds):
        strengths = list(first[kind])
        for label, runs in results.items():
            values = np.array([[r[kind][s] for s in strengths] for r in runs])
            std = values.std(0, ddof=1) if len(runs) > 1 else None
            ax.errorbar(range(len(strengths)), values.mean(0), yerr=std, marker='o', capsize=3,
                        label=f'{label} ({len(runs)} seed{"s" * (len(runs) > 1)})')
        ax.set_xticks(range(len(strengths)), strengths)
        ax.set_title(kind)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('linear-probe top-1 (%)')
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def machine():
    """CPU model, cores, native bf16 and torch version of this machine."""
    import torch
    cpu = platform.processor() or 'unknown CPU'
    try:
        cpu = re.search(r'Model name:\s*(.+)', subprocess.run(['lscpu'], capture_output=True, text=True).stdout).group(1).strip()
    except (OSError, AttributeError):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
                torch=torch.__version__)  # threads per process: the run's own first line (stdout_head)


def collect(out_dir, name, stdout, command, eval_file, note, shared):
    """results/runs/NAME/{log.jsonl, run.json[, eval.json]} from a finished run's --out-dir and saved stdout
    (with `time`'s real line if it was timed). Machine paths become runs/NAME and DATA/<folder>."""
    lines = open(stdout, errors='replace').read().replace('\r', '\n').splitlines()
    config_line = [l for l in lines if l.startswith('config: ')]
    final = [l for l in lines if l.startswith('final ')]
    if not config_line or not final:
        sys.exit(f'error: {stdout} has no config: line or no final line; is the run finished?')
    config = json.loads(config_line[-1][len('config: '):])
    config['out_dir'] = f'runs/{name}'
    if config.get('data_path'):
        config['data_path'] = 'DATA/' + os.path.basename(os.path.normpath(config['data_path']))
    if eval_file:
        result = eval_result(eval_file)
    dest = os.path.join(RUNS, name)
    if os.path.exists(dest):
        sys.exit(f'error: {dest} exists (remove it to collect the run again)')
    os.makedirs(dest)
    shutil.copy(os.path.join(out_dir, 'log.jsonl'), os.path.join(dest, 'log.jsonl'))
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
    meta = dict(command=command, machine=machine(), dtype=config.get('dtype'), collected_at_commit=commit,
                wall=[l.strip() for l in lines if l.startswith('real')], note=note,
                stdout_head=[l for l in lines[:3] if not l.startswith('config: ')], final=final[-1], config=config,
                shared=shared)
    if eval_file:
        result['settings'].update(ckpt=f'runs/{name}/ckpt.pt', data_path=config.get('data_path'))
        json.dump(result, open(os.path.join(dest, 'eval.json'), 'w'))
        meta['eval'] = 'eval.json: the last JSON line of eval_linear.py on this run\'s ckpt.pt'
    json.dump(meta, open(os.path.join(dest, 'run.json'), 'w'), indent=1)
    print('wrote', dest)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('what', choices=('tables', 'figures', 'collect', 'robustness'))
    p.add_argument('inputs', nargs='*', help='collect: OUT_DIR NAME; robustness: eval JSON files')
    p.add_argument('--labels', nargs='+', help='robustness: one per file; files sharing a label are pooled (seeds)')
    p.add_argument('-o', '--out', default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument('--stdout', help='collect: the saved output of the run')
    p.add_argument('--command', help='collect: the command that made the run')
    p.add_argument('--eval', help='collect: the saved output of eval_linear.py on the run')
    p.add_argument('--note', default='', help='collect: anything a reader should know about the run')
    p.add_argument('--shared', action='store_true', help='collect: the machine ran other jobs too (its times are not timings)')
    a = p.parse_args()
    if a.what == 'tables':
        print_tables(load_runs())
    elif a.what == 'figures':
        figures(load_runs(), a.out)
    elif a.what == 'collect':
        if len(a.inputs) != 2 or not a.stdout or not a.command:
            p.error('collect needs OUT_DIR NAME --stdout FILE --command "..."')
        collect(*a.inputs, a.stdout, a.command, a.eval, a.note, a.shared)
    else:
        if not a.inputs or (a.labels and len(a.labels) != len(a.inputs)):
            p.error('robustness needs EVAL_JSON files and, if --labels is given, one label per file')
        out = os.path.join(a.out, 'robustness.png') if os.path.isdir(a.out) else a.out
        robustness(a.inputs, a.labels or a.inputs, out)


if __name__ == '__main__':
    main()
