"""``nnunet-selfreg add-unlabeled``: a new raw dataset = a labelled dataset plus unlabelled images.

Each unlabelled image becomes a training case whose label map is entirely nnU-Net's ignore label, and
dataset.json records the unlabelled case ids (see :mod:`nnunet_selfreg.data.semisupervised`), so the
standard ``nnUNetv2_plan_and_preprocess`` handles the new dataset and ``nnUNetTrainerSSNet`` trains on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_selfreg.errors import UserError
from nnunet_selfreg.json_files import read_json
from nnunet_selfreg.nnunet_folders import (
    DATASET_JSON,
    SPLITS_JSON,
    dataset_folders_with_id,
    env_folder,
    find_free_dataset_id,
    require_env_folder,
    resolve_dataset,
)

DESCRIPTION = (
    "Write a new dataset in $nnUNet_raw: the labelled dataset SOURCE (copied unchanged) plus the images of "
    "UNLABELED_FOLDER as unlabelled training cases (label maps filled with nnU-Net's ignore label, listed in "
    f"{DATASET_JSON} under \"nnunet_selfreg\"). Unlabelled images use the dataset's file ending and nnU-Net's naming "
    "CASE_XXXX<ending>; single-channel datasets also accept CASE<ending>. With --keep-labels (the papers' 5% / "
    "10% protocol), only that many labelled cases keep their labels; -i is then optional. Nothing existing is "
    "overwritten."
)


def _source_folder(raw: Path, source: str) -> Path:
    name = resolve_dataset(source)
    folder = raw / name
    if not folder.is_dir():
        raise UserError(f"dataset {source!r} ({name}) is not in nnUNet_raw={raw}: it needs its raw folder there")
    return folder


def _id_users(dataset_id: int, *roots: Path | None) -> list[Path]:
    return sorted(p for r in roots for p in dataset_folders_with_id(r, dataset_id))


def _new_id(requested: int | None, source_id: int, raw: Path, preprocessed: Path | None, results: Path | None) -> int:
    if requested is None:
        try:
            return find_free_dataset_id(raw, preprocessed, results, start=source_id + 1)
        except RuntimeError:
            try:
                return find_free_dataset_id(raw, preprocessed, results, start=1)
            except RuntimeError:
                raise UserError("no free nnU-Net dataset id (1..999) is left; remove a dataset") from None
    if not 1 <= requested <= 999:
        raise UserError(f"-o {requested}: nnU-Net dataset ids have three digits (1..999)")
    users = _id_users(requested, raw, preprocessed, results)
    if users:
        raise UserError(f"dataset id {requested} is in use ({users[0]}); choose another -o or leave it out")
    return requested


def _cases(n: int) -> str:
    return f"{n} case{'' if n == 1 else 's'}"


def _keeping(spec: str | None) -> str:
    """``--keep-labels`` in words: ``N`` cases or ``P%`` of the labelled cases."""
    if spec is None:
        return ""
    text = str(spec).strip()
    if text.endswith("%"):
        return f", keeping the labels of {text} of its labelled cases"
    return f", keeping the labels of {_cases(int(text)) if text.isdigit() else text + ' case(s)'}"


class _Progress:
    """Progress lines; the first one is preceded by ``header``, so nothing is announced before the input is checked.

    The dataset builder checks its arguments and the source dataset before it copies anything and reports
    progress only while copying, so such an error ends the command before any "adding ... as dataset N" line.
    """

    def __init__(self, header: str) -> None:
        self.header = header

    def __call__(self, done: int, total: int, message: str) -> None:
        if self.header:
            print(self.header, flush=True)
            self.header = ""
        if done == total or done % max(1, total // 10) == 0 or message.startswith("copied"):
            print(f"  [{done}/{total}] {message}", flush=True)


def _next_steps(new_id: int, n_labeled: int) -> list[str]:
    """The commands that work for this many labelled cases (nnU-Net's 5 folds need 5)."""
    steps = [f"  nnUNetv2_plan_and_preprocess -d {new_id} --verify_dataset_integrity"]
    if n_labeled >= 5:
        return [
            *steps,
            f"  nnUNetv2_train {new_id} CONFIGURATION FOLD -tr nnUNetTrainerSSNet   # 2d, 3d_fullres, ...; FOLD 0-4",
            f"  nnUNetv2_train {new_id} CONFIGURATION FOLD -tr nnUNetTrainer_LabeledOnly   # baseline, same folds",
        ]
    return [
        f"  note: {_cases(n_labeled)} with labels: nnU-Net's 5-fold cross-validation needs "
        "at least 5, so folds 0-4 cannot be trained. Fold 'all' trains on every labelled case (its validation "
        "scores those same cases: no held-out result); for a held-out result keep more labels, or write your own "
        f"{SPLITS_JSON} into the dataset's nnUNet_preprocessed folder (unlabelled cases in 'train' only)",
        *steps,
        f"  nnUNetv2_train {new_id} CONFIGURATION all -tr nnUNetTrainerSSNet   # 2d, 3d_fullres, ...",
        f"  nnUNetv2_train {new_id} CONFIGURATION all -tr nnUNetTrainer_LabeledOnly   # baseline, same cases",
    ]


def run(args: argparse.Namespace) -> int:
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    from nnunet_selfreg.data.semisupervised import (
        SEMISUPERVISED_KEY,
        SemiSupervisedDataError,
        build_semi_supervised_dataset,
        ignore_label_value,
    )

    raw = require_env_folder("nnUNet_raw")
    preprocessed, results = env_folder("nnUNet_preprocessed"), env_folder("nnUNet_results")
    source = _source_folder(raw, args.dataset)
    new_id = _new_id(args.new_id, convert_dataset_name_to_id(source.name), raw, preprocessed, results)
    if args.unlabeled is None and args.keep_labels is None:
        raise UserError("give -i UNLABELED_FOLDER, or --keep-labels N (or P%) to strip the labels of the other cases")
    what = f"the unlabelled images of {Path(args.unlabeled).absolute()}" if args.unlabeled else "no new images"
    progress = _Progress(f"adding {what} to {source.name}{_keeping(args.keep_labels)} as dataset {new_id}")
    try:
        target = build_semi_supervised_dataset(
            source,
            Path(args.unlabeled) if args.unlabeled else None,
            raw,
            new_id,
            name=args.name,
            prefix=args.prefix,
            progress=progress,
            keep_labels=args.keep_labels,
            keep_seed=args.seed,
        )
    except SemiSupervisedDataError as e:
        raise UserError(str(e)) from None

    dataset_json = read_json(target / DATASET_JSON)
    entry = dataset_json[SEMISUPERVISED_KEY]
    print(
        f"wrote {target}: {entry['labeled_cases']} labelled + {len(entry['unlabeled_cases'])} unlabelled cases, "
        f"ignore label {ignore_label_value(dataset_json)}"
    )
    if any(str(v).strip().lower() == "ct" for v in dataset_json.get("channel_names", {}).values()):
        print(
            "  note: nnU-Net's fingerprint counts the unlabelled (all-ignore) images as foreground, which shifts "
            "the CT normalisation statistics"
        )
    withheld = entry.get("withheld_labels")
    if withheld:
        print(
            f"  {_cases(len(withheld['cases']))} lost their labels (kept in {target / withheld['folder']}); "
            f"labelled: {', '.join(withheld['kept'])}"
        )
    print("next:")
    print("\n".join(_next_steps(new_id, int(entry["labeled_cases"]))))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "add-unlabeled",
        help="new raw dataset = a labelled dataset plus unlabelled images (for SS-Net semi-supervised training)",
        description=DESCRIPTION,
    )
    p.add_argument("-d", dest="dataset", required=True, help="labelled source dataset: id or DatasetXXX_Name")
    p.add_argument("-i", dest="unlabeled", default=None, metavar="UNLABELED_FOLDER", help="unlabelled images")
    p.add_argument(
        "--keep-labels",
        default=None,
        metavar="N|P%",
        help="the papers' protocol: keep the labels of N (or P%%) labelled cases, drawn with --seed; the others "
        "become unlabelled and their labels are kept aside in labelsTr_withheld/",
    )
    p.add_argument("--seed", type=int, default=12345, help="seed of the --keep-labels draw (default: 12345)")
    p.add_argument("-o", dest="new_id", type=int, default=None, metavar="NEW_ID", help="new dataset id (default: free)")
    p.add_argument("--name", default=None, help="name of the new dataset (default: the source's name + 'SemiSup')")
    p.add_argument("--prefix", default="", help="prefix for the unlabelled case ids (avoids clashes, e.g. unl_)")
    p.set_defaults(func=run)
