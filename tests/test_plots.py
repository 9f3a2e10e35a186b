"""results/plots.py: runs grouped into the study's cells, mean +/- std over seeds, what is owed."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results'))
import plots  # noqa: E402

DINO = dict(method='dino', data='shapes', data_path=None, dilemma_prob=0.0, dilemma_weight=1.0, drop_ratio=0.0,
            epochs=3, batch_size=64, lr=1e-3, seed=0, out_dir='x', workers=2)


def make_run(root, name, knn, probe=None, bench_ms=None, equal_time=None, **overrides):
    folder = root / name
    folder.mkdir()
    config = dict(DINO, **overrides)
    steps = [20, 40]
    with open(folder / 'log.jsonl', 'w') as f:
        for step in steps:
            f.write(json.dumps({'step': step, 'loss': 1.0, 'images_per_s': 64.0}) + '\n')  # 1 s a step
        f.write(json.dumps({'step': 40, 'knn_top1': knn, 'knn_top5': 90.0}) + '\n')
    meta = dict(command='...', config=config, **({'bench_step_ms': bench_ms} if bench_ms else {}),
                **({'equal_time': equal_time} if equal_time else {}))
    json.dump(meta, open(folder / 'run.json', 'w'))
    if probe is not None or name.endswith('noprobe'):
        json.dump({'results': {'knn_top1': knn, **({'probe_top1': probe} if probe is not None else {})}},
                  open(folder / 'eval.json', 'w'))


def test_seeds_pool_into_one_cell_and_other_data_or_flags_do_not(tmp_path, capsys):
    make_run(tmp_path, 'base_s0', 30.0, probe=31.0, bench_ms=1000)
    make_run(tmp_path, 'base_s1', 32.0, probe=33.0, bench_ms=1000, seed=1, out_dir='y', workers=8)
    make_run(tmp_path, 'dil_s0', 34.0, bench_ms=750, dilemma_prob=0.2, drop_ratio=0.5)
    make_run(tmp_path, 'dil_time_s0', 33.0, bench_ms=1000, dilemma_prob=0.2, drop_ratio=0.5, epochs=4)  # same time
    make_run(tmp_path, 'dil_long_s0', 33.0, bench_ms=750, dilemma_prob=0.2, drop_ratio=0.5, epochs=5)  # 25% less
    make_run(tmp_path, 'dil_lr_s0', 20.0, dilemma_prob=0.2, drop_ratio=0.5, lr=4e-3)
    make_run(tmp_path, 'base_c10_noprobe', 40.0, data='folder', data_path='/somewhere/cifar10-45k')
    make_run(tmp_path, 'base_c10b', 41.0, data='folder', data_path='/somewhere/cifar10-6k')
    table = plots.cells(plots.load_runs(str(tmp_path)))
    shapes = {c['label']: sorted(r['name'] for r in c['runs']) for c in table[('dino', 'shapes')]}
    assert shapes == {'baseline': ['base_s0', 'base_s1'], '+ DILEMMA, equal epochs': ['dil_s0'],
                      '+ DILEMMA, equal time': ['dil_time_s0'], '+ DILEMMA, 5 epochs': ['dil_long_s0'],
                      '+ DILEMMA (lr=0.004)': ['dil_lr_s0']}
    assert [len(table[('dino', d)]) for d in ('cifar10-45k', 'cifar10-6k')] == [1, 1]
    assert plots.mean_std([30.0, 32.0]) == '31.00 +/- 1.41' and plots.mean_std([None]) == '-'
    plots.print_tables(plots.load_runs(str(tmp_path)), root=str(tmp_path))  # an eval.json without a probe is fine
    out = capsys.readouterr().out
    assert '| dino | shapes | baseline | 3 (40) | 2 (0, 1) | 31.00 +/- 1.41 | 32.00 +/- 1.41 |' in out
    assert '- dino on shapes, baseline: 2 of 3 seeds' in out
    assert '- dino on shapes, + DILEMMA, equal epochs: 1 of 3 seeds' in out  # the lr ablation is not counted
    assert '- dino on cifar10-45k, baseline: 1 of 3 seeds' in out


def test_the_sparsity_arm_is_paired_like_dilemma_and_owed_at_equal_epochs(tmp_path, capsys):
    moco = dict(method='mocov3', epochs=10)
    make_run(tmp_path, 'base', 30.0, bench_ms=1000, **moco)
    make_run(tmp_path, 'sparse', 31.0, bench_ms=500, drop_ratio=0.5, **moco)
    # (the fake logs all have 40 steps: a bench time as the baseline's stands for 2x the steps at half the cost)
    make_run(tmp_path, 'sparse_time', 32.0, bench_ms=1000, drop_ratio=0.5, **dict(moco, epochs=20))
    labels = {c['label']: [r['name'] for r in c['runs']] for c in plots.cells(plots.load_runs(str(tmp_path)))[('mocov3', 'shapes')]}
    assert labels == {'baseline': ['base'], '+ sparsity, equal epochs': ['sparse'], '+ sparsity, equal time': ['sparse_time']}
    plots.print_tables(plots.load_runs(str(tmp_path)), root=str(tmp_path))
    out = capsys.readouterr().out
    assert '- mocov3 on shapes, + sparsity, equal epochs: 1 of 3 seeds' in out
    assert '- dino on shapes, + sparsity, equal epochs: 0 of 3 seeds' in out
    assert 'simclr on shapes, + sparsity' not in out  # the design asks it of DINO and MoCo v3 only


def test_training_time_is_steps_times_the_bench_step_time_when_known(tmp_path):
    make_run(tmp_path, 'a', 30.0, bench_ms=500)
    make_run(tmp_path, 'b', 30.0)
    a, b = plots.load_runs(str(tmp_path))
    assert plots.training_seconds(a) == ([0, 20, 40], [0.0, 10.0, 20.0])
    assert plots.training_seconds(b) == ([0, 20, 40], [0.0, 20.0, 40.0])  # 64 images at 64 images/s a step
    # a time axis that mixes the two says so, rather than naming one kind for both
    assert plots.time_kind([a]) == ' (steps x bench step time)' and plots.time_kind([b]) == ' (logged)'
    assert plots.time_kind([a, b]) == ' (steps x bench step time, else logged)'


def test_a_pair_of_equal_cost_fills_equal_epochs_and_equal_time_only_when_every_run_says_so(tmp_path, capsys):
    mae = dict(method='mae', drop_ratio=0.75, epochs=20)
    why = 'same FLOPs; step-time ratio within the timing noise'
    for seed in (0, 1, 2):
        make_run(tmp_path, f'base_s{seed}', 30.0 + seed, bench_ms=1000, equal_time=why, seed=seed, **mae)
        make_run(tmp_path, f'dil_s{seed}', 31.0 + seed, bench_ms=1000, equal_time=why, seed=seed, dilemma_prob=0.2, **mae)
    make_run(tmp_path, 'dil_unsaid', 31.0, bench_ms=1000, dilemma_prob=0.2, lr=2e-3, **mae)
    make_run(tmp_path, 'base_unsaid', 31.0, bench_ms=1000, lr=2e-3, **mae)
    labels = {c['label']: sorted(r['name'] for r in c['runs']) for c in plots.cells(plots.load_runs(str(tmp_path)))[('mae', 'shapes')]}
    assert labels['+ DILEMMA, equal epochs = equal time'] == ['dil_s0', 'dil_s1', 'dil_s2']
    assert labels['+ DILEMMA, equal epochs'] == ['dil_unsaid']  # no run.json says the costs are equal: epochs only
    plots.print_tables(plots.load_runs(str(tmp_path)), root=str(tmp_path))
    out = capsys.readouterr().out
    assert '- mae on shapes, baseline:' not in out
    assert '- mae on shapes, + DILEMMA, equal epochs:' not in out and '- mae on shapes, + DILEMMA, equal time:' not in out
    assert '- mae on cifar10-45k, + DILEMMA, equal time: 0 of 3 seeds' in out


def test_a_pair_at_equal_epochs_without_the_equal_cost_reason_leaves_equal_time_owed(tmp_path, capsys):
    mae = dict(method='mae', drop_ratio=0.75, epochs=20)
    for seed in (0, 1, 2):  # the baselines say the costs are equal, the DILEMMA runs do not: not both
        make_run(tmp_path, f'base_s{seed}', 30.0, bench_ms=1000, equal_time='same FLOPs', seed=seed, **mae)
        make_run(tmp_path, f'dil_s{seed}', 31.0, bench_ms=1000, seed=seed, dilemma_prob=0.2, **mae)
    plots.print_tables(plots.load_runs(str(tmp_path)), root=str(tmp_path))
    out = capsys.readouterr().out
    assert '| mae | shapes | + DILEMMA, equal epochs | 20 (40) | 3 (0, 1, 2) |' in out
    assert '- mae on shapes, + DILEMMA, equal epochs:' not in out
    assert '- mae on shapes, + DILEMMA, equal time: 0 of 3 seeds' in out


def test_collect_reads_a_timed_eval_and_writes_nothing_when_the_eval_has_no_result(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, 'RUNS', str(tmp_path / 'runs'))
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'log.jsonl').write_text(json.dumps({'step': 40, 'knn_top1': 33.0, 'knn_top5': 90.0}) + '\n')
    stdout = tmp_path / 'train.out'
    stdout.write_text('header\nconfig: ' + json.dumps(dict(DINO, out_dir=str(out))) + '\n'
                      'final k-NN top-1 33.00 (top-5 90.00) at step 40\n\nreal\t1m2.000s\n')
    timed_eval = tmp_path / 'eval.out'  # `{ time python eval_linear.py ...; } > FILE 2>&1`: the JSON is not last
    timed_eval.write_text('k-NN 33.00\n' + json.dumps({'results': {'knn_top1': 33.0, 'probe_top1': 35.0},
                                                       'settings': {}}) + '\n\nreal\t0m5.000s\nuser\t0m4.000s\n')
    plots.collect(str(out), 'r', str(stdout), 'python dilemma.py ...', str(timed_eval), '', True)
    dest = tmp_path / 'runs' / 'r'
    assert json.load(open(dest / 'eval.json'))['results']['probe_top1'] == 35.0
    meta = json.load(open(dest / 'run.json'))
    assert meta['wall'] == ['real\t1m2.000s'] and meta['config']['out_dir'] == 'runs/r'
    unfinished = tmp_path / 'unfinished.out'
    unfinished.write_text('k-NN 33.00\n')
    with pytest.raises(SystemExit, match='no JSON line'):
        plots.collect(str(out), 'r2', str(stdout), '...', str(unfinished), '', True)
    assert not (tmp_path / 'runs' / 'r2').exists()  # nothing half-written to commit by mistake


def test_robustness_pools_files_with_one_label_into_mean_and_std(tmp_path, capsys):
    files = []
    for i, (label, clean, noisy) in enumerate([('A', 40.0, 30.0), ('A', 44.0, 20.0), ('B', 35.0, 25.0)]):
        path = tmp_path / f'eval{i}.json'
        rob = {'noise': {'0': clean, '0.1': noisy}, 'fgsm': {'1/255': noisy / 10}}
        path.write_text('progress line\n' + json.dumps({'results': {'robustness': rob}}) + '\n\nreal\t3m1.000s\n')  # timed
        files.append(str(path))
    plots.robustness(files, ['A', 'A', 'B'], None)  # the table alone: no matplotlib needed
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == '| method (seeds) | noise 0 / 0.1 | fgsm 1/255 |'
    assert rows[2] == '| A (2) | 42.0 +/- 2.8 / 25.0 +/- 7.1 | 2.5 +/- 0.7 |'  # std of (40, 44) is 2.83
    assert rows[3] == '| B (1) | 35.0 / 25.0 | 2.5 |'
    pytest.importorskip('matplotlib')
    plots.robustness(files, ['A', 'A', 'B'], str(tmp_path / 'fig.png'))
    assert (tmp_path / 'fig.png').stat().st_size > 0


def test_an_ablation_of_p_gets_its_own_labelled_row_and_fills_no_cell_of_the_design(tmp_path, capsys):
    mae = dict(method='mae', drop_ratio=0.75, epochs=20)
    why = 'same FLOPs'
    make_run(tmp_path, 'base', 30.0, bench_ms=1000, equal_time=why, **mae)
    make_run(tmp_path, 'dil', 31.0, bench_ms=1000, equal_time=why, dilemma_prob=0.2, **mae)
    for seed in (0, 1, 2):  # three seeds of p = 0.4 must not make the design's p = 0.2 cell look full
        make_run(tmp_path, f'dil_p04_s{seed}', 32.0, bench_ms=1000, equal_time=why, seed=seed, dilemma_prob=0.4, **mae)
        meta = json.load(open(tmp_path / f'dil_p04_s{seed}' / 'run.json'))
        json.dump(dict(meta, ablation='p = 0.4 (the design uses 0.2)'), open(tmp_path / f'dil_p04_s{seed}' / 'run.json', 'w'))
    # lambda = 0 makes a second 'baseline' (no detection loss): as an ablation it must not steal the pairing
    make_run(tmp_path, 'dil_lambda0', 29.0, bench_ms=1000, equal_time=why, dilemma_prob=0.2, dilemma_weight=0.0, **mae)
    meta = json.load(open(tmp_path / 'dil_lambda0' / 'run.json'))
    json.dump(dict(meta, ablation='lambda = 0'), open(tmp_path / 'dil_lambda0' / 'run.json', 'w'))
    labels = {c['label']: sorted(r['name'] for r in c['runs']) for c in plots.cells(plots.load_runs(str(tmp_path)))[('mae', 'shapes')]}
    assert labels == {'baseline (p=0, lambda=1)': ['base'], 'baseline (p=0.2, lambda=0)': ['dil_lambda0'],
                      '+ DILEMMA, equal epochs = equal time (p=0.2)': ['dil'],
                      '+ DILEMMA, equal epochs = equal time (p=0.4)': ['dil_p04_s0', 'dil_p04_s1', 'dil_p04_s2']}
    plots.print_tables(plots.load_runs(str(tmp_path)), root=str(tmp_path))
    out = capsys.readouterr().out
    assert '- mae on shapes, + DILEMMA, equal time: 1 of 3 seeds' in out


def test_the_auroc_figure_sets_each_ablation_beside_the_design_run_of_its_own_epochs(tmp_path):
    moco = dict(method='mocov3', drop_ratio=0.5, epochs=10)
    make_run(tmp_path, 'base', 30.0, bench_ms=1000, **dict(moco, drop_ratio=0.0))
    make_run(tmp_path, 'dil', 31.0, bench_ms=500, dilemma_prob=0.2, **moco)
    make_run(tmp_path, 'dil_time', 32.0, bench_ms=500, dilemma_prob=0.2, **dict(moco, epochs=20))
    for name, flags in (('p04', dict(dilemma_prob=0.4)), ('drop75', dict(dilemma_prob=0.2, drop_ratio=0.75)),
                        ('lambda0', dict(dilemma_prob=0.2, dilemma_weight=0.0))):  # lambda 0: no head, no line
        make_run(tmp_path, name, 33.0, **dict(moco, **flags))
        meta = json.load(open(tmp_path / name / 'run.json'))
        json.dump(dict(meta, ablation=name), open(tmp_path / name / 'run.json', 'w'))
    panels = plots.ablation_panels(plots.load_runs(str(tmp_path)))
    named = {flag: [(label, [r['name'] for r in runs]) for label, runs in lines] for flag, lines in panels[('mocov3', 'shapes')].items()}
    assert named == {'p': [('design (p=0.2)', ['dil']), ('p=0.4', ['p04'])],
                     'drop': [('design (drop=0.5)', ['dil']), ('drop=0.75', ['drop75'])]}
    assert list(panels) == [('mocov3', 'shapes')]  # no ablation, no figure


def test_the_knn_figure_draws_the_arms_of_the_design_and_leaves_the_ablations_to_the_tables(tmp_path):
    moco = dict(method='mocov3', drop_ratio=0.5, epochs=10)
    make_run(tmp_path, 'base', 30.0, bench_ms=1000, **dict(moco, drop_ratio=0.0))
    make_run(tmp_path, 'dil', 31.0, bench_ms=500, dilemma_prob=0.2, **moco)
    make_run(tmp_path, 'sparse_time', 31.5, bench_ms=500, dilemma_prob=0.0, **dict(moco, epochs=20))
    make_run(tmp_path, 'p04', 33.0, dilemma_prob=0.4, **moco)
    meta = json.load(open(tmp_path / 'p04' / 'run.json'))
    json.dump(dict(meta, ablation='p = 0.4'), open(tmp_path / 'p04' / 'run.json', 'w'))
    row = plots.cells(plots.load_runs(str(tmp_path)))[('mocov3', 'shapes')]
    assert len(row) == 4
    drawn = sorted(r['name'] for c in plots.design_cells(row) for r in c['runs'])
    assert drawn == ['base', 'dil', 'sparse_time']


def test_probe_against_auroc_takes_each_runs_last_auroc_and_its_probe_and_the_other_arms_as_lines(tmp_path):
    moco = dict(method='mocov3', drop_ratio=0.5, epochs=10)
    make_run(tmp_path, 'base', 30.0, probe=34.0, **dict(moco, drop_ratio=0.0))
    make_run(tmp_path, 'base_s1', 30.0, probe=36.0, seed=1, **dict(moco, drop_ratio=0.0))
    make_run(tmp_path, 'dil', 31.0, probe=39.0, dilemma_prob=0.2, **moco)
    make_run(tmp_path, 'dil_noprobe', 31.0, dilemma_prob=0.2, seed=1, **moco)  # eval.json without a probe: no point
    for name, aurocs in (('dil', (0.6, 0.88)), ('dil_noprobe', (0.6, 0.7))):
        with open(tmp_path / name / 'log.jsonl', 'a') as f:
            for step, auroc in zip((60, 80), aurocs):
                f.write(json.dumps({'step': step, 'loss': 1.0, 'images_per_s': 64.0, 'det_auroc': auroc}) + '\n')
    points, baselines = plots.probe_against_auroc(plots.load_runs(str(tmp_path)))[('mocov3', 'shapes')]
    assert [(p[3], p[1], p[2]) for p in points] == [('dil', 0.88, 39.0)]
    assert [(label, probe) for label, probe in baselines] == [('baseline', 35.0)]


def test_co_byol_cells_of_another_receptive_field_are_named_by_arch_and_fill_no_cell_of_the_design(tmp_path, capsys):
    co = dict(arch='rf25_small', width=0.125, local_weight=0.3, crop_min=0.2, epochs=16)
    for name, overrides in [('co', {}), ('byol', dict(local_weight=0.0)),
                            ('co_rf17', dict(arch='rf17_small')), ('byol_rf17', dict(arch='rf17_small', local_weight=0.0))]:
        make_run(tmp_path, name, 30.0, probe=31.0, **dict(co, **overrides))
        if 'rf17' in name:  # the receptive-field study is not the design's cell at the default network
            meta = json.load(open(tmp_path / name / 'run.json'))
            json.dump(dict(meta, ablation='rf17_small'), open(tmp_path / name / 'run.json', 'w'))
    labels = {c['label']: [r['name'] for r in c['runs']] for c in plots.cells(plots.load_runs(str(tmp_path)))[('co_byol', 'shapes')]}
    assert labels == {'CO-BYOL (arch=rf25_small)': ['co'], 'BYOL (arch=rf25_small)': ['byol'],
                      'CO-BYOL (arch=rf17_small)': ['co_rf17'], 'BYOL (arch=rf17_small)': ['byol_rf17']}
    plots.print_tables(plots.load_runs(str(tmp_path)), root=str(tmp_path))
    out = capsys.readouterr().out
    assert '- co_byol on shapes, CO-BYOL: 1 of 3 seeds' in out  # the rf17 run does not count for the default cell


def test_a_co_byol_cell_whose_partner_has_not_run_names_its_arch_once(tmp_path):
    co = dict(arch='rf25_small', width=0.125, local_weight=0.3, crop_min=0.2, epochs=16)
    for name, overrides in [('co', {}), ('byol', dict(local_weight=0.0)), ('co_rf49', dict(arch='rf49_small'))]:
        make_run(tmp_path, name, 30.0, probe=31.0, **dict(co, **overrides))  # BYOL on rf49_small not yet run
    labels = sorted(c['label'] for c in plots.cells(plots.load_runs(str(tmp_path)))[('co_byol', 'shapes')])
    assert labels == ['BYOL', 'CO-BYOL (arch=rf25_small)', 'CO-BYOL (arch=rf49_small)']


def test_a_local_grid_cell_is_labelled_alike_at_every_arch_whatever_order_the_runs_load_in(tmp_path):
    # the label names what differs from the *nearest* cell of the other arm: with BYOL at rf17 loaded before
    # BYOL at rf25, the first difference found for the rf25 cell was (local_grid, arch), for rf17 (local_grid)
    co = dict(arch='rf25_small', width=0.125, local_weight=0.3, crop_min=0.2, epochs=16, local_grid=0)
    for name, overrides in [('a_byol_rf17', dict(arch='rf17_small', local_weight=0.0)), ('b_byol', dict(local_weight=0.0)),
                            ('c_co', {}), ('d_co_rf17', dict(arch='rf17_small')),
                            ('e_grid4', dict(local_grid=4)), ('f_grid4_rf17', dict(local_grid=4, arch='rf17_small'))]:
        make_run(tmp_path, name, 30.0, probe=31.0, **dict(co, **overrides))
    labels = {c['label']: [r['name'] for r in c['runs']] for c in plots.cells(plots.load_runs(str(tmp_path)))[('co_byol', 'shapes')]}
    assert labels['CO-BYOL (local_grid=4, arch=rf25_small)'] == ['e_grid4']
    assert labels['CO-BYOL (local_grid=4, arch=rf17_small)'] == ['f_grid4_rf17']
    assert labels['CO-BYOL (arch=rf17_small)'] == ['d_co_rf17'] and labels['BYOL (arch=rf17_small)'] == ['a_byol_rf17']


def test_a_labels_flags_keep_one_order_whichever_pass_named_them(tmp_path):
    # crop-min=0.5 is named against the nearest CO-BYOL cell, arch later because BYOL cells differ in it:
    # both must read in the order of the rf17 row, which names them the other way round
    co = dict(arch='rf25_small', width=0.125, local_weight=0.3, crop_min=0.2, epochs=16)
    for name, overrides in [('co', {}), ('byol', dict(local_weight=0.0)), ('co_rf17', dict(arch='rf17_small')),
                            ('byol_rf17', dict(arch='rf17_small', local_weight=0.0)),
                            ('byol_crop05', dict(crop_min=0.5, local_weight=0.0))]:
        make_run(tmp_path, name, 30.0, probe=31.0, **dict(co, **overrides))
    labels = {c['label']: [r['name'] for r in c['runs']] for c in plots.cells(plots.load_runs(str(tmp_path)))[('co_byol', 'shapes')]}
    assert labels['BYOL (arch=rf25_small, crop-min=0.5)'] == ['byol_crop05']
    assert labels['BYOL (arch=rf17_small, crop-min=0.2)'] == ['byol_rf17']


def test_co_byol_studies_put_each_seed_at_its_receptive_field_or_crop_scale_and_leave_other_changes_out(tmp_path, capsys):
    co = dict(arch='rf25_small', width=0.125, local_weight=0.3, crop_min=0.2, epochs=16, local_grid=0, img_size=32,
              local_loss='symmetric')
    byol = dict(local_weight=0.0)
    for name, knn, overrides, why in [
            ('byol', 31.0, byol, None), ('byol_s1', 33.0, dict(byol, seed=1), None), ('co', 36.0, {}, None),
            ('co_4ep', 20.0, dict(epochs=4), None), ('byol_4ep', 19.0, dict(byol, epochs=4), None),  # a shorter pair
            ('co_rf49', 35.0, dict(arch='rf49_small'), 'rf49'), ('byol_rf49', 32.0, dict(byol, arch='rf49_small'), 'rf49'),
            ('co_grid4', 34.0, dict(local_grid=4), 'grid'), ('co_crop05', 30.0, dict(crop_min=0.5), 'crop'),
            ('co_rf49_crop05', 29.0, dict(arch='rf49_small', crop_min=0.5), 'both'),  # two studies' flags: neither
            ('co_oneway', 37.0, dict(local_loss='one_way'), 'loss'),  # another ablation: in no study
            ('co_w1', 10.0, dict(local_weight=1.0), 'w'),  # another local weight: in no study
            ('co_old', 12.0, dict(arch='rf49_small'), 'old')]:  # below: its config lacks a flag of the design's
        make_run(tmp_path, name, knn, probe=knn + 1 if name != 'byol_s1' else None, **dict(co, **overrides))
        if why:
            meta = json.load(open(tmp_path / name / 'run.json'))
            config = {k: v for k, v in meta['config'].items() if name != 'co_old' or k != 'img_size'}
            json.dump(dict(meta, ablation=why, config=config), open(tmp_path / name / 'run.json', 'w'))
    os.remove(tmp_path / 'co_rf49' / 'log.jsonl')  # a run without k-NN keeps its probe
    open(tmp_path / 'co_rf49' / 'log.jsonl', 'w').write(json.dumps({'step': 20, 'loss': 1.0, 'images_per_s': 64.0}) + '\n')
    studies = plots.co_byol_studies(plots.load_runs(str(tmp_path)))
    assert set(studies) == {('shapes', 'receptive_field'), ('shapes', 'crop_min')}
    points, ticks = studies[('shapes', 'receptive_field')]
    assert points == {'BYOL': {25: [(31.0, 32.0, 'byol'), (33.0, None, 'byol_s1')], 49: [(32.0, 33.0, 'byol_rf49')]},
                      'CO-BYOL': {25: [(36.0, 37.0, 'co')], 49: [(None, 36.0, 'co_rf49')]},
                      'CO-BYOL, 4 x 4 locals': {25: [(34.0, 35.0, 'co_grid4')]}}
    assert ticks == {25: '25\nrf25_small\n8 x 8 map', 49: '49\nrf49_small\n4 x 4 map'}
    points, ticks = studies[('shapes', 'crop_min')]
    assert points == {'BYOL': {0.2: [(31.0, 32.0, 'byol'), (33.0, None, 'byol_s1')]},
                      'CO-BYOL': {0.2: [(36.0, 37.0, 'co')], 0.5: [(30.0, 31.0, 'co_crop05')]}}
    assert ticks == {0.2: '0.2', 0.5: '0.5'}
    plots.print_tables(plots.load_runs(str(tmp_path)), root=str(tmp_path))  # the studies' cells in the owed list
    owed = capsys.readouterr().out.split('Still owed')[1]
    assert '- co_byol on shapes, CO-BYOL at --crop-min 0.5 (crop-scale study): 1 of 3 seeds' in owed
    assert '- co_byol on shapes, BYOL at --crop-min 0.5 (crop-scale study): 0 of 3 seeds' in owed
    assert '- co_byol on shapes, BYOL at --crop-min 0.2 (crop-scale study): 2 of 3 seeds' in owed  # the design's cell
    assert '- co_byol on shapes, CO-BYOL at --arch rf49_small (receptive-field study): 1 of 3 seeds' in owed
    assert '- co_byol on shapes, CO-BYOL at --arch rf17_small (receptive-field study): 0 of 3 seeds' in owed


def test_the_co_byol_study_figure_is_drawn_for_a_study_with_two_values(tmp_path):
    pytest.importorskip('matplotlib')
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    co = dict(arch='rf25_small', width=0.125, local_weight=0.3, crop_min=0.2, epochs=16, local_grid=0, img_size=32)
    (tmp_path / 'runs').mkdir()
    make_run(tmp_path / 'runs', 'co', 36.0, probe=37.0, **co)
    make_run(tmp_path / 'runs', 'co_s1', 35.0, probe=38.0, **dict(co, seed=1))
    make_run(tmp_path / 'runs', 'co_rf17', 34.0, probe=35.0, **dict(co, arch='rf17_small'))
    plots.co_byol_study_figures(plots.load_runs(str(tmp_path / 'runs')), str(tmp_path), plt)
    assert sorted(os.listdir(tmp_path)) == ['co_byol_receptive_field_shapes.png', 'runs']  # no crop study: one value


def test_the_study_legend_names_the_seeds_behind_each_point_only_where_they_differ():
    assert plots.seeds_per_point({0.5: 1, 0.2: 3}) == 'seeds: 3 at 0.2, 1 at 0.5'
    assert plots.seeds_per_point({17: 3, 25: 3, 49: 3}) == '3 seeds at each'
    assert plots.seeds_per_point({17: 1, 25: 1}) == '1 seed at each'  # not '1 seeds'
