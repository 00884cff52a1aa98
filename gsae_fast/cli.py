"""The ``gsae-fast`` command: ``demo``, ``cache``, ``train``, ``eval``, ``features``, ``study``.

    gsae-fast demo                       # synthetic features, no download: train, recover, time
    gsae-fast cache --model DIR --data a.txt b.jsonl --layer resid:6 --out acts/
    gsae-fast train --cache acts/ --out run/ --d-sae 16384 --l1-coefficient 1 --steps 20000
    gsae-fast train --model DIR --data a.txt --layer resid:6 --out run/ ...
    gsae-fast eval run/sae --cache acts/ [--model DIR --data a.txt --layer resid:6]
    gsae-fast features run/sae --model DIR --data a.txt --layer resid:6 --out dash/

Every TrainConfig field is a ``train`` flag (``--d-sae``, ``--lr``, ...), with the help and
choices its field declares; ``--resume`` continues a run from its ``checkpoint.pt``;
``--config FILE`` reads the flags from a JSON (or YAML) file, by their field and option names
(``{"d_sae": 4096, "lr": 1e-4, "cache": "acts/", "out": "run/"}``), the command line winning.

This module parses the flags and calls the library: the demo is :mod:`gsae_fast.demo`, the
data :mod:`gsae_fast.data.sources`, training :mod:`gsae_fast.train`, the metrics and the CE
loss recovered :mod:`gsae_fast.metrics`, the studies :mod:`gsae_fast.study`.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from dataclasses import asdict, fields

import torch

from . import files, metrics

# The --config / --sweep files: read and checked as the flags would be (gsae_fast.cli_config).
from .cli_config import ConfigError, _subparser, config_defaults, sweep_values
from .data import sources
from .demo import DEMO, TIMING, run_demo
from .interop import load
from .progress import Progress
from .train import TrainConfig, Trainer


def _say(*args) -> None:
    print(*args, flush=True)  # flushed: the lines interleave with the progress bar on stderr


def demo(args) -> dict:
    return run_demo(**{k: v for k, v in vars(args).items() if k not in ("command", "func")})


# ------------------------------------------------------------------- model, cache, train, eval


def _loaded_model(args):
    """``(model, tokenizer)`` from --model, after checking --data and --layer. Loaded once per
    command (kept on ``args``): ``train`` evaluates on the model it trained from."""
    if not args.data:
        raise ValueError("--model needs --data (text files: .txt, .jsonl, or a directory of "
                         "them)")
    if not args.layer:
        raise ValueError("--model needs --layer (a module name of the model, or resid:N / "
                         "mlp:N / attn:N)")
    if getattr(args, "_loaded", None) is None:
        from .hooks import load_model
        args._loaded = load_model(args.model, device=args.device)
    return args._loaded


def _data_options(args) -> dict:
    """The options of --data's reading and context handling (model_flags), by their keyword
    in gsae_fast.data.sources."""
    return dict(text_column=args.text_column, split=args.data_split,
                prepend_bos=args.prepend_bos, exclude_special_tokens=args.exclude_special_tokens)


def cache(args) -> dict:
    model, tokenizer = _loaded_model(args)
    # a bar against --max-tokens; without it, the running count and rate
    bar = Progress(args.max_tokens, "cache", enabled=not args.quiet, unit="tokens")
    out = sources.write_model_cache(
        model, tokenizer, args.data, args.layer, args.out, model_name=args.model,
        context_len=args.context_len, batch_contexts=args.batch_contexts, dtype=args.dtype,
        shard_tokens=args.shard_tokens, max_tokens=args.max_tokens, overwrite=args.overwrite,
        progress=lambda n, total: bar(n, total), **_data_options(args))
    bar.finish(out["n_tokens"])
    _say(f"wrote {out['n_tokens']} activations of width {out['d_in']} ({args.dtype}) from "
         f"{out['metadata']['layer']} to {args.out}")
    return out


def _train_data(args, rank: int = 0, world: int = 1):
    """(batches, d_in, description) from --cache or --model; with ``world`` ranks, rank
    ``rank``'s share of every step's tokens."""
    if args.cache:
        return sources.cache_training_batches(args.cache, args.batch_size, seed=args.seed,
                                              device=args.device, rank=rank, world=world)
    if args.model:
        model, tokenizer = _loaded_model(args)
        return sources.model_training_batches(
            model, tokenizer, args.data, args.layer, args.batch_size, seed=args.seed,
            buffer_tokens=args.buffer_tokens, context_len=args.context_len,
            batch_contexts=args.batch_contexts, model_name=args.model, rank=rank, world=world,
            **_data_options(args))
    raise ValueError("give --cache DIR (from gsae-fast cache) or --model DIR --data FILES "
                     "--layer NAME")


def _config_fields() -> list:
    """The TrainConfig fields that are ``train`` flags (all but those marked ``flag: False``)."""
    return [f for f in fields(TrainConfig) if f.metadata.get("flag", True)]


def _sinks(args, cfg, run_dir: str, name=None) -> list:
    """The logging sinks --tensorboard / --wandb ask for (gsae_fast.sinks)."""
    if args.tensorboard is None and args.wandb is None:
        return []
    from . import sinks
    tb = args.tensorboard
    if tb is not None and name is not None:  # a sweep: one folder per member
        tb = os.path.join(tb, name)
    return sinks.open_sinks(tensorboard=tb, wandb_project=args.wandb, run_dir=run_dir,
                            config=asdict(cfg), name=name, resume=args.resume)


def _config_dict(args) -> dict:
    """The TrainConfig fields of the command line (None: left to the architecture's recipe)."""
    # argparse gives a list for a tuple field (nargs): back to the field's type
    return {f.name: tuple(getattr(args, f.name)) if isinstance(getattr(args, f.name), list)
            else getattr(args, f.name) for f in _config_fields()}


def train(args) -> dict:
    if args.sweep:
        return train_sweep(args)
    rank, world = 0, 1
    if args.parallel != "none":  # under torchrun
        from . import distributed
        rank, world, device = distributed.init(args.device)
        args.device = str(device)
    data, d_in, described = _train_data(args, rank, world)
    cfg = TrainConfig(**_config_dict(args), extra=described)
    sinks = _sinks(args, cfg, args.out) if rank == 0 else []
    # The trainer holds the run folder from here until summary.json is written.
    with Trainer(cfg, d_in, data, args.out, device=args.device, resume=args.resume,
                 overwrite=args.overwrite, sinks=sinks) as trainer:
        for note in trainer.notes if rank == 0 else ():
            _say(note)
        bar = Progress(cfg.steps, "train", enabled=not args.quiet and rank == 0)

        def progress(step, total, r):
            if "skipped" in r:
                _say(f"step {step}: skipped ({r['skipped']})")
            bar(step, total, f"loss={r['loss']:.4g} mse={r['mse']:.4g} L0={r['l0']:.3g} "
                             f"dead={100 * r['dead_fraction']:.0f}%")

        try:
            trainer.train(progress=progress)
        finally:
            for sink in sinks:
                sink.close()
        sae = trainer.export_sae() if rank == 0 and cfg.parallel != "feature" else trainer.sae
        if args.parallel != "none":
            import torch.distributed as dist
            dist.destroy_process_group()  # the evaluation runs on rank 0 alone
            if rank != 0:
                return {}
            if args.parallel == "feature":  # the whole SAE the trainer exported, once this
                trainer.sae = trainer.opt = sae = None  # rank's slice is freed
                sae = load(os.path.join(args.out, "sae"), device=args.device,
                           backend=cfg.backend)
        _say(f"trained {cfg.steps} steps; SAE in {args.out}/sae (SAELens format)")
        summary = _evaluate(sae, args)
        files.write_json(summary, os.path.join(args.out, "summary.json"))
    return summary


def train_sweep(args) -> dict:
    """--sweep: every member trained on one pass over the data (gsae_fast.sweep), then each
    evaluated as a single run is (OUT/NAME/summary.json)."""
    from .sweep import SweepTrainer, members
    parser = _subparser(build_parser(), "train")
    combos = sweep_values(args.sweep, parser, {f.name for f in _config_fields()})
    if args.parallel != "none":
        raise ValueError("--sweep runs in one process: drop --parallel (or train the members "
                         "as separate runs)")
    data, d_in, described = _train_data(args)
    cfgs, names = members(dict(_config_dict(args), extra=described), combos)
    sinks = {n: _sinks(args, c, os.path.join(args.out, n), name=n) for c, n in zip(cfgs, names)}
    with SweepTrainer(cfgs, d_in, data, args.out, names=names, device=args.device,
                      resume=args.resume, overwrite=args.overwrite, sinks=sinks) as sweep:
        for note in sweep.notes:
            _say(note)
        bar = Progress(cfgs[0].steps, "sweep", enabled=not args.quiet)

        def progress(step, total, records):
            for name, r in records.items():
                if "skipped" in r:
                    _say(f"{name} step {step}: skipped ({r['skipped']})")
            bar(step, total, " ".join(f"L0={r['l0']:.3g}" for r in records.values()))

        try:
            sweep.train(progress=progress)
        finally:
            for member_sinks in sinks.values():
                for sink in member_sinks:
                    sink.close()
        _say(f"trained {len(cfgs)} SAEs for {cfgs[0].steps} steps on one pass over the data: "
             f"{', '.join(names)} in {args.out}/NAME/sae (SAELens format)")
        out = {}
        for m, name in zip(sweep.members, names):
            _say(f"{name}:")
            summary = _evaluate(m.export_sae(), args)
            files.write_json(summary, os.path.join(args.out, name, "summary.json"))
            out[name] = summary
    return out


def _evaluate(sae, args) -> dict:
    """Metrics over --eval-tokens activations (of the cache or the model: the training data
    unless they point elsewhere), and with a model the CE loss recovered on --ce-contexts
    contexts from the start of the texts (:func:`gsae_fast.metrics.evaluate_ce_loss`)."""
    sae.eval()
    model = source = None
    if args.model:
        model, tokenizer = _loaded_model(args)
        source = sources.text_activations(model, tokenizer, args.data, args.layer,
                                          context_len=args.context_len,
                                          batch_contexts=args.batch_contexts,
                                          **_data_options(args))
    if args.cache:
        batches = sources.cache_eval_batches(args.cache, sae.d_in, seed=args.seed,
                                             device=args.device)
    elif source is not None:
        batches = source
    else:
        raise ValueError("give --cache DIR or --model DIR --data FILES --layer NAME")
    summary = {"metrics": metrics.evaluate(sae, batches, max_tokens=args.eval_tokens)}
    if source is not None:
        source.rewind()  # the metrics may have read from the source
        tokens = source.token_contexts(args.ce_contexts)
        summary["ce_loss"] = metrics.evaluate_ce_loss(sae, model, args.layer, tokens)
    m = summary["metrics"]
    _say(f"L0 {m['l0']:.2f}  FVE {m['fve']:.4f}  nMSE {m['nmse']:.4f}  relative reconstruction "
         f"bias {m['relative_reconstruction_bias']:.4f}  dead {100 * m['dead_fraction']:.1f}%  "
         f"dense {100 * m['dense_fraction']:.1f}%  ({m['tokens']} tokens)")
    if "ce_loss" in summary:
        ce = summary["ce_loss"]
        _say(f"CE loss: clean {ce['clean']:.4f}, SAE spliced in {ce['with_sae']:.4f}, zero-"
             f"ablated {ce['zero_ablated']:.4f}: {100 * ce['recovered']:.1f}% recovered")
        if ce["zero_ablated"] <= ce["clean"]:
            _say("warning: zero-ablating this layer does not raise the loss on these texts, so "
                 "the recovered fraction means nothing here (more --ce-contexts, another layer?)")
    return summary


def eval_command(args) -> dict:
    from .interop import load
    sae = load(args.sae, device=args.device)
    summary = _evaluate(sae, args)
    if args.dashboard:
        summary["feature_effects"] = _eval_effects_page(sae, args)
    if args.json:
        files.write_json(summary, args.json)
    return summary


def _eval_effects_page(sae, args) -> dict:
    """--dashboard DIR: the features whose zero-ablation moves the LM loss most (attribution
    patching on the --ce-contexts contexts), a page DIR/eval_effects.html linked into DIR."""
    from . import dashboard
    if not args.model:
        raise ValueError("--dashboard needs --model, --data and --layer: the effects are on "
                         "the model's loss")
    index = dashboard.read_index(args.dashboard)
    if index is None or index["d_sae"] != sae.d_sae:
        raise ValueError(f"{args.dashboard} holds no dashboard of this SAE ({sae.d_sae} "
                         f"features): build it with gsae-fast features {args.sae} --out "
                         f"{args.dashboard} ...")
    model, tokenizer = _loaded_model(args)
    source = sources.text_activations(model, tokenizer, args.data, args.layer,
                                      context_len=args.context_len)
    effects = dashboard.loss_effects(sae, model, args.layer,
                                     source.token_contexts(args.ce_contexts))
    page = dashboard.write_effects_page(
        effects, args.dashboard, os.path.join(args.dashboard, "eval_effects.html"),
        title=f"Features of {args.sae} by effect on the loss",
        note="Change in the mean next-token loss when the feature is zero-ablated "
             "(attribution patching); positive: the feature lowers the loss.")
    _say(f"features by effect on the loss: {page}")
    top = effects.abs().argsort(descending=True)[:10].tolist()
    return {"page": page, "top": [[f, float(effects[f])] for f in top]}


def features(args) -> dict:
    """The feature dashboard (gsae_fast/dashboard.py): a static site in --out."""
    from . import dashboard
    from .interop import load
    sae = load(args.sae, device=args.device)
    model, tokenizer = _loaded_model(args)
    summary = dashboard.build_dashboard(
        sae, model, tokenizer, args.data, args.layer, args.out, tokens=args.tokens,
        k=args.top_k, context_len=args.context_len, batch_contexts=args.batch_contexts,
        resume=args.resume, through_norm=args.final_norm, neuronpedia=args.neuronpedia,
        quiet=args.quiet, names={"sae": os.path.abspath(args.sae),
                                 "model": os.path.abspath(args.model)})
    _say(f"dashboard of {summary['features']} features ({summary['dead']} never fired) over "
         f"{summary['tokens']} tokens: open {summary['index']}")
    return summary


def study(args) -> dict:
    """The studies of gsae_fast/study.py on the embedded setup, written to --out:
    ``aux`` (the loss design: study_aux.md, .json, .png) and ``estimators`` (feature-effect
    estimators vs exact patching: study_estimators.md, .json, .png)."""
    from . import study as S
    out = {}
    if args.which in ("aux", "all"):
        out["aux"] = S.run_aux_study(steps=args.steps, seed=args.seed, device=args.device,
                                     backend=args.backend, out=args.out, quiet=args.quiet)
    if args.which in ("estimators", "all"):
        out["estimators"] = S.run_estimator_study(
            train_steps=args.train_steps, pairs=args.pairs, seed=args.seed,
            device=args.device, backend=args.backend, out=args.out, quiet=args.quiet)
    return out


# -------------------------------------------------------------------------------------- parser


def _add_train_config_flags(p: argparse.ArgumentParser) -> None:
    """A flag per TrainConfig field, its help and choices from the field's metadata."""
    for f in _config_fields():
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        kw = dict(default=f.default, help=meta.get("help", "") + " (default: %(default)s)")
        if isinstance(f.default, bool):  # --flag / --no-flag
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(f.default, tuple):  # a fixed number of values
            kw["default"] = list(f.default)
            p.add_argument(flag, type=type(f.default[0]), nargs=len(f.default), **kw)
        elif meta.get("nargs"):  # the same, with a default the architecture decides
            p.add_argument(flag, type=meta["type"], nargs=meta["nargs"], **kw)
        else:  # a None default says nothing of the type: the field's metadata does
            typ = meta.get("type") or (str if f.default is None else type(f.default))
            p.add_argument(flag, type=typ, choices=meta.get("choices"), **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsae-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    d = sub.add_parser("demo", help="train on synthetic features with known ground truth "
                                    "(no download) and report recovery, metrics and speed")
    for k, v in DEMO.items():
        d.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    d.add_argument("--time-d-in", type=int, default=TIMING["time_d_in"],
                   help="the larger SAE whose step is also timed (input width)")
    d.add_argument("--time-d-sae", type=int, default=TIMING["time_d_sae"])
    d.add_argument("--time-l0", type=float, default=TIMING["time_l0"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backend", default="auto")
    d.add_argument("--device", default=device)
    d.add_argument("--out", default="gsae_demo")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=demo)

    def model_flags(p, required=False):
        p.add_argument("--model", required=required,
                       help="a local transformers model directory (nothing is downloaded)")
        p.add_argument("--data", nargs="+", help=(
            "text files (.txt: a document per line; .jsonl: a JSON object per line) or folders "
            "of them; or datasets (pip install gsae_fast[datasets]): a save_to_disk folder, "
            ".parquet / .arrow files or a folder of them; read locally, nothing is fetched"))
        p.add_argument("--text-column", default="text", help=(
            "the column (.jsonl: field) holding the texts, or pre-tokenized token ids such as "
            "input_ids, used as they are (default: %(default)s)"))
        p.add_argument("--data-split", default=None,
                       help="the split of a DatasetDict folder (default: train)")
        p.add_argument("--layer", default=None,
                       help="module name (model.named_modules) or resid:N / mlp:N / attn:N")
        p.add_argument("--context-size", "--context-len", dest="context_len", type=int,
                       default=128, metavar="N", help="tokens per context (default: %(default)s)")
        p.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=False,
                       help="start every context with BOS, as SAELens' prepend_bos (documents "
                            "are always separated by BOS, else EOS) (default: %(default)s)")
        p.add_argument("--exclude-special-tokens", action=argparse.BooleanOptionalAction,
                       default=False, help="train on no position holding a special token "
                                           "(BOS, EOS, PAD, ...) (default: %(default)s)")
        p.add_argument("--batch-contexts", type=int, default=8)

    c = sub.add_parser("cache", help="run a model over texts and write a layer's activations "
                                     "to disk")
    model_flags(c, required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    c.add_argument("--shard-tokens", type=int, default=2 ** 20)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--device", default=device)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cache)

    t = sub.add_parser("train", help="train an SAE (--arch gated, jumprelu, topk, batchtopk) "
                                     "from a cache or a model")
    t.add_argument("--config", metavar="FILE", help=(
        "a JSON file (or .yaml/.yml with PyYAML installed) of train options by name: the "
        "TrainConfig fields and this command's other options, underscored, e.g. "
        '{"d_sae": 4096, "lr": 1e-4, "steps": 2000, "cache": "acts/", "out": "run/"}; '
        "flags given on the command line override it; paths are relative to the working "
        "directory"))
    t.add_argument("--cache", help="an activation cache (gsae-fast cache)")
    model_flags(t)
    t.add_argument("--buffer-tokens", type=int, default=2 ** 16,
                   help="mixing buffer size (from a model)")
    t.add_argument("--out", required=True)
    # --no-X as well: a flag undoes what a --config file turned on
    on_off = dict(action=argparse.BooleanOptionalAction, default=False)
    t.add_argument("--resume", **on_off, help="continue from OUT/checkpoint.pt")
    t.add_argument("--overwrite", **on_off, help="replace a run already in OUT")
    t.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...|FILE", help=(
        "train several SAEs on one pass over the data, each batch produced once: KEY=V1,V2,... "
        "(repeatable: every combination) for any SAE setting, e.g. --sweep "
        "l1_coefficient=0.5,1,2 --sweep arch=gated,jumprelu; or a JSON/YAML file listing the "
        "members' settings. Each member gets OUT/NAME/ (log.jsonl, sae/, summary.json)"))
    t.add_argument("--tensorboard", metavar="DIR", help="also log to TensorBoard event files "
                   "in DIR (pip install gsae_fast[tensorboard])")
    t.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (offline "
                   "unless WANDB_MODE says otherwise; pip install gsae_fast[wandb])")
    t.add_argument("--eval-tokens", type=int, default=2 ** 16)
    t.add_argument("--ce-contexts", type=int, default=32)
    t.add_argument("--device", default=device)
    t.add_argument("--quiet", **on_off, help="no progress bar")
    _add_train_config_flags(t)
    t.set_defaults(func=train)

    e = sub.add_parser("eval", help="metrics of a saved SAE (and the CE loss recovered on the "
                                    "model)")
    e.add_argument("sae", help="an SAE folder (SAELens format, e.g. OUT/sae) or ae.pt folder")
    e.add_argument("--cache")
    model_flags(e)
    e.add_argument("--eval-tokens", type=int, default=2 ** 16)
    e.add_argument("--ce-contexts", type=int, default=32)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="also write the results here")
    e.add_argument("--dashboard", metavar="DIR",
                   help="a feature dashboard of this SAE (gsae-fast features): write "
                        "DIR/eval_effects.html, the features by effect on the loss, linked "
                        "into it (needs --model)")
    e.add_argument("--device", default=device)
    e.set_defaults(func=eval_command)

    fe = sub.add_parser("features", help="a feature dashboard: a static site of every "
                                         "feature (top contexts, sample, histogram, logit "
                                         "tables) that opens from disk")
    fe.add_argument("sae", help="an SAE folder (SAELens format, e.g. OUT/sae) or ae.pt folder")
    model_flags(fe, required=True)
    fe.add_argument("--out", required=True, help="the site's folder (open OUT/index.html)")
    fe.add_argument("--tokens", type=int, default=2 ** 20, help="tokens to read from the "
                    "texts (fewer if they end first)")
    fe.add_argument("--top-k", type=int, default=20,
                    help="top activations and sampled ones kept per feature")
    fe.add_argument("--final-norm", action="store_true",
                    help="logit tables through the model's final norm")
    fe.add_argument("--neuronpedia", action=argparse.BooleanOptionalAction, default=True,
                    help="also write OUT/neuronpedia/batch-N.json (SAEDashboard's layout)")
    fe.add_argument("--resume", action="store_true",
                    help="continue the reduction saved in OUT (or add --tokens to it)")
    fe.add_argument("--device", default=device)
    fe.add_argument("--quiet", action="store_true", help="no progress bar")
    fe.set_defaults(func=features)

    s = sub.add_parser("study", help="measured studies on the embedded setup: the Gated SAE's "
                                     "auxiliary term (frozen / shared / none) and the "
                                     "feature-effect estimators (AtP, IG, jump-aware IG) "
                                     "against exact patching")
    s.add_argument("--which", choices=("aux", "estimators", "all"), default="all")
    s.add_argument("--steps", type=int, default=DEMO["steps"],
                   help="training steps of the aux study")
    s.add_argument("--train-steps", type=int, default=600,
                   help="training steps of each SAE of the estimator study")
    s.add_argument("--pairs", type=int, default=16,
                   help="clean/patch pairs of the estimator study")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--backend", default="auto")
    s.add_argument("--device", default=device)
    s.add_argument("--out", default=os.path.join("bench", "results"))
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=study)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; for ``train --config FILE``, the file's options are the defaults that
    the flags given override (a required flag the file gives is no longer required)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        pre = argparse.ArgumentParser(prog="gsae-fast train", add_help=False)
        pre.add_argument("--config")
        path = pre.parse_known_args(argv[1:])[0].config
        if path:
            t = _subparser(parser, "train")
            values = config_defaults(path, t)
            for action in t._actions:
                if action.dest in values:
                    action.required = False
            t.set_defaults(**values)
    return parser.parse_args(argv)


# Errors of the file system that are the user's to fix (a full disk, a folder that cannot be
# written, a path that is a file): their message names the path. Other OSErrors are bugs.
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                  errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT}


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as e:  # one line, as for the other errors of the input
        print(f"gsae-fast train: error: {e}", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except (ValueError, RuntimeError, FloatingPointError, OSError, ImportError) as e:
        # bad input or a failed run: the message, no traceback
        if isinstance(e, OSError) and e.errno is not None and e.errno not in USER_OS_ERRORS:
            raise  # (an OSError without errno is one of this package's, with its message)
        print(f"gsae-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
