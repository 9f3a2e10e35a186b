"""
Tables and plots of RESULTS.md, from the runs' own files (matplotlib is needed by this script only:
pip install matplotlib).

    python results/plots.py knn-vs-time OUT_DIR... --labels A B -o results/knn_vs_time.png
    python results/plots.py robustness EVAL_JSON... --labels A B -o results/robustness.png
    python results/plots.py table OUT_DIR...        # markdown: steps, training time, final k-NN, detection

knn-vs-time reads OUT_DIR/log.jsonl: training time is summed from the logged images/s (evaluation and
checkpoint time excluded, as the scripts measure it). robustness reads the JSON line that
`eval_linear.py CKPT --robustness` prints last (saved with `| tail -n 1 > FILE`).
"""
import argparse
import json
import os

import numpy as np


def read_log(out_dir):
    """(training records, evaluation records), each with 'seconds': training time up to that step."""
    records = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]
    train = [r for r in records if 'loss' in r]
    seconds, last_step, steps, times = 0.0, 0, [0], [0.0]
    for r in train:
        seconds += (r['step'] - last_step) * batch_size(out_dir) / r['images_per_s']
        last_step, r['seconds'] = r['step'], seconds
        steps.append(r['step'])
        times.append(seconds)
    # evaluations fall between log steps: interpolate the training time linearly
    evals = [dict(r, seconds=float(np.interp(r['step'], steps, times))) for r in records if 'knn_top1' in r]
    return train, evals


def batch_size(out_dir, _cache={}):
    if out_dir not in _cache:
        import torch
        ckpt = torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=False)
        _cache[out_dir] = ckpt['args']['batch_size']
    return _cache[out_dir]


def knn_vs_time(dirs, labels, out):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for d, label in zip(dirs, labels):
        _, evals = read_log(d)
        ax.plot([e['seconds'] / 60 for e in evals], [e['knn_top1'] for e in evals], marker='o', label=label)
    ax.set_xlabel('training time (min, 2 CPU cores, evaluation excluded)')
    ax.set_ylabel('k-NN top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def robustness(files, labels, out):
    import matplotlib.pyplot as plt
    results = [json.loads(open(f).read().strip().splitlines()[-1])['results']['robustness'] for f in files]
    kinds = list(results[0])
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.2), sharey=True)
    for ax, kind in zip(axes, kinds):
        for r, label in zip(results, labels):
            strengths = list(r[kind])
            ax.plot(range(len(strengths)), [r[kind][s] for s in strengths], marker='o', label=label)
        ax.set_xticks(range(len(strengths)), strengths)
        ax.set_title(kind)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('linear-probe top-1 (%)')
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def table(dirs):
    print('| run | steps | training time (min) | final k-NN top-1 | last detection acc. |')
    print('|---|---|---|---|---|')
    for d in dirs:
        train, evals = read_log(d)
        det = train[-1].get('det_acc') if train[-1].get('detect_loss') else None  # 0 when DILEMMA is off
        print(f"| {d} | {train[-1]['step']} | {train[-1]['seconds'] / 60:.1f} | {evals[-1]['knn_top1']:.2f} | "
              f"{f'{det:.3f}' if det is not None else '-'} |")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('what', choices=('knn-vs-time', 'robustness', 'table'))
    p.add_argument('inputs', nargs='+')
    p.add_argument('--labels', nargs='+')
    p.add_argument('-o', '--out')
    a = p.parse_args()
    labels = a.labels or a.inputs
    if a.what == 'knn-vs-time':
        knn_vs_time(a.inputs, labels, a.out)
    elif a.what == 'robustness':
        robustness(a.inputs, labels, a.out)
    else:
        table(a.inputs)
