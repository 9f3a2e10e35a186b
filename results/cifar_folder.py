"""Write CIFAR-10's training split as an ImageFolder tree with a fixed held-out part, for --data folder.

RESULTS.md's CIFAR-10 runs use such trees, taken from CIFAR-10's *training* split only (the official
test split stays untouched for independent evaluation): cifar10-6k for the short runs, cifar10-45k for
the longer ones:

    cifar10-6k:   python results/cifar_folder.py DIR/cifar10-6k --train-per-class 500 --val-per-class 100
    cifar10-45k:  python results/cifar_folder.py DIR/cifar10-45k --train-per-class 4500 --val-per-class 500

The split is fixed and written down: per class, in the order of the source (torchvision's CIFAR-10 order,
or the sorted file names of --from-folder), the first N images go to train/ and the next M to val/.
The source is torchvision's CIFAR-10 (--cifar-root, downloaded there with --download), or a folder that
already holds train/<class>/*.{png,jpg} (--from-folder; its files are linked, not copied). Images taken
from torchvision are written as PNG (lossless); the copies our runs used were JPEG re-encodings of the
same images, so a tree made here is like them, not byte-identical.
"""
import argparse
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n\n', 1)[1])
parser.add_argument('out', help='the folder to write: OUT/train/<class>/, OUT/val/<class>/ (must not exist yet)')
parser.add_argument('--train-per-class', type=int, default=500)
parser.add_argument('--val-per-class', type=int, default=100)
parser.add_argument('--cifar-root', default='data/cifar10', help="torchvision's CIFAR-10 root")
parser.add_argument('--download', action='store_true', help='let torchvision download CIFAR-10 to --cifar-root')
parser.add_argument('--from-folder', default=None, help='a folder with train/<class>/ images, instead of torchvision')


def from_torchvision(root, download):
    """{class name: [PIL image, ...]} in torchvision's order."""
    import torchvision
    try:
        dataset = torchvision.datasets.CIFAR10(root, train=True, download=download)
    except RuntimeError as e:  # torchvision's 'Dataset not found or corrupted'
        sys.exit(f'error: CIFAR-10 not found under {root} ({e}); add --download, or use --from-folder')
    images = {name: [] for name in dataset.classes}
    for image, label in dataset:
        images[dataset.classes[label]].append(image)
    return images


def from_folder(path):
    """{class name: [file path, ...]} sorted by file name."""
    train = os.path.join(path, 'train')
    if not os.path.isdir(train):
        sys.exit(f'error: --from-folder needs DIR/train/<class>/ (no folder {train})')
    return {c: [os.path.join(train, c, f) for f in sorted(os.listdir(os.path.join(train, c)))]
            for c in sorted(os.listdir(train)) if os.path.isdir(os.path.join(train, c))}


def write_split(images, out, n_train, n_val):
    """Per class: the first n_train to out/train/<class>/, the next n_val to out/val/<class>/."""
    for name, items in images.items():
        if len(items) < n_train + n_val:
            sys.exit(f'error: class {name} has {len(items)} images, fewer than {n_train} + {n_val}')
    for name, items in images.items():
        for split, chosen in (('train', items[:n_train]), ('val', items[n_train:n_train + n_val])):
            os.makedirs(os.path.join(out, split, name))
            for i, item in enumerate(chosen):
                if isinstance(item, str):  # a file: link it, keeping its extension
                    os.symlink(os.path.abspath(item), os.path.join(out, split, name, f'{i:04d}{os.path.splitext(item)[1]}'))
                else:
                    item.save(os.path.join(out, split, name, f'{i:04d}.png'))


def main(argv=None):
    args = parser.parse_args(argv)
    if args.train_per_class < 1 or args.val_per_class < 1:  # an empty val/ would stop the k-NN monitor
        sys.exit('error: --train-per-class and --val-per-class must be >= 1')
    if os.path.exists(args.out):
        sys.exit(f'error: {args.out} exists; choose a new folder')
    images = from_folder(args.from_folder) if args.from_folder else from_torchvision(args.cifar_root, args.download)
    write_split(images, args.out, args.train_per_class, args.val_per_class)
    print(f'wrote {args.out}: {len(images)} classes x ({args.train_per_class} train + {args.val_per_class} val)')


if __name__ == '__main__':
    main()
