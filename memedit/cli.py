"""The `memedit` command line: demo, model catalogue, and edits on a persistent memory."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from memedit.errors import InvalidRequestError, MemeditError
from memedit.types import EditRequest


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _cmd_models_list(args: argparse.Namespace) -> int:
    from memedit.models import DEFAULT_MODEL, is_pulled, list_models

    rows = []
    for e in list_models():
        rows.append(
            {
                "name": e.name,
                "default": e.name == DEFAULT_MODEL,
                "pulled": is_pulled(e.name),
                "verified": e.verified,
                "architecture": e.architecture,
                "description": e.description,
            }
        )
    if args.json:
        _out(json.dumps(rows, indent=2))
        return 0
    _out(f"{'name':<22}{'arch':<14}{'pulled':<8}{'verified':<10}description")
    for r in rows:
        name = f"{r['name']}{' *' if r['default'] else ''}"
        _out(
            f"{name:<22}{r['architecture']:<14}{'yes' if r['pulled'] else 'no':<8}"
            f"{'yes' if r['verified'] else 'no':<10}{r['description']}"
        )
    _out("* default; any transformers model id or local directory also works")
    return 0


def _cmd_models_pull(args: argparse.Namespace) -> int:
    from memedit.models import pull

    path = pull(args.name, progress=not args.quiet)
    _out(f"{args.name}: {path}")
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from memedit.editable import EditableModel

    with EditableModel.load(args.model, memory=args.memory, url=args.url) as em:
        if args.raw:
            answer = em.generate(args.question, max_new_tokens=args.max_new_tokens)
        else:
            answer = em.chat(
                [{"role": "user", "content": args.question}], max_new_tokens=args.max_new_tokens
            )
    if args.json:
        _out(json.dumps({"answer": answer.text, "decision": answer.decision.to_dict()}, indent=2))
    else:
        _out(answer.text.strip())
        d = answer.decision
        used = ", ".join(f"#{i}" for i in d.used_edit_ids) or "none"
        _out(f"[in scope: {d.in_scope}; edits used: {used}]")
    return 0


def _read_requests(path: Path) -> list[EditRequest]:
    """Edit requests from a JSON file (one object or a list), naming the bad entry."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        msg = f"{path} is not UTF-8 text (bad byte at offset {exc.start})"
        raise InvalidRequestError(msg, field="file", value=str(path)) from exc
    except json.JSONDecodeError as exc:
        msg = f"{path} is not valid JSON: {exc}"
        raise InvalidRequestError(msg, field="file", value=str(path)) from exc
    items = data if isinstance(data, list) else [data]
    out: list[EditRequest] = []
    for i, d in enumerate(items):
        try:
            out.append(EditRequest.from_dict(d))
        except InvalidRequestError as exc:
            msg = f"{path}: request {i}: {exc}"
            raise InvalidRequestError(msg, field=exc.field, value=exc.value) from exc
    return out


def _cmd_edit(args: argparse.Namespace) -> int:
    from memedit.stores.memory import EditMemory

    if args.file:
        requests = _read_requests(Path(args.file))
    else:
        if not args.prompt or not args.target:
            _out("memedit edit: give --prompt and --target (or --file)")
            return 2
        requests = [EditRequest(prompt=args.prompt, target_new=args.target, subject=args.subject)]
    if args.strategy in ("weights", "adapter"):
        from memedit.editable import EditableModel
        from memedit.evaluation.strategies import parse_strategy

        spec = parse_strategy(
            f"{args.strategy}:{args.method}" + (f"@{args.options}" if args.options else "")
        )
        options = dict(spec.config().get("options", {}))
        with EditableModel.load(args.model, memory=args.memory, url=args.url) as em:
            records = em.edit(requests, strategy=args.strategy, method=args.method, **options)
    else:
        if args.method or args.options:
            _out("memedit edit: --method and --options apply to --strategy weights/adapter only")
            return 2
        with EditMemory.open(args.memory, url=args.url) as mem:
            records = mem.add(requests)
    for r in records:
        _out(f"#{r.id}: {r.request.fact}")
    return 0


def _cmd_edits(args: argparse.Namespace) -> int:
    from memedit.stores.memory import EditMemory

    with EditMemory.open(args.memory, url=args.url) as mem:
        for r in mem.list(include_rolled_back=args.all):
            how = r.strategy if r.strategy == "memory" else f"{r.strategy}:{r.method}"
            _out(f"#{r.id} [{r.status}] ({how}) {r.request.fact}")
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from memedit.stores.memory import EditMemory

    with EditMemory.open(args.memory, url=args.url) as mem:
        in_weights = mem.get(args.edit_id).strategy == "weights"
        if not in_weights:
            r = mem.remove(args.edit_id)
    if in_weights:  # undone on the model, newest batch first, through the wrapper
        from memedit.editable import EditableModel

        with EditableModel.load(args.model, memory=args.memory, url=args.url) as em:
            r = em.rollback(args.edit_id)
    _out(f"rolled back #{r.id}: {r.request.fact}")
    return 0


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _cmd_eval(args: argparse.Namespace) -> int:
    from memedit.datasets import KNOWEDIT_DATASETS
    from memedit.evaluation import EvalConfig, EvalOptions, run_eval, write_reports

    datasets: list[str] = []
    for item in args.dataset or ["ZsRE"]:
        datasets += list(KNOWEDIT_DATASETS) if item == "all" else list(_csv(item))
    config = EvalConfig(
        datasets=tuple(dict.fromkeys(datasets)),
        strategies=_csv(args.strategies),
        model=args.model,
        limit=args.limit,
        sequential=args.sequential,
        checkpoints=tuple(int(c) for c in _csv(args.checkpoints or "")),
        edit_batch=args.edit_batch,
        out=args.out,
        seed=args.seed,
        workers=args.workers,
        root=args.data_dir,
        split=args.split,
        verify_revert=args.verify_revert,
        options=EvalOptions(
            fluency_tokens=args.fluency_tokens,
            generation=not args.no_generation,
            unrelated=args.unrelated,
        ),
    )
    if not args.report_only:
        run_eval(config, progress=not args.quiet)
    paths = write_reports(config.out)
    _out(paths["md"].read_text(encoding="utf-8"))
    _out(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    from memedit.evaluation import write_results

    path = write_results(args.dirs, args.write, notes=args.notes)
    _out(f"written: {path}")
    return 0


def _cmd_locate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from memedit.locate import run_locate, spec_hint

    doc = run_locate(
        args.model,
        n=args.n,
        out=Path(args.out),
        samples=args.samples,
        progress=not args.quiet,
        workers=args.workers,
        sources=[x.strip() for x in args.facts.split(",") if x.strip()],
    )
    rec = doc["recommendation"]
    _out(
        f"{doc['facts_known']} of {doc['facts_examined']} facts known; traced {doc['facts_traced']}"
        f" in {doc['seconds']:.0f} s"
    )
    if args.n > doc["facts_known"]:
        _out(
            f"warning: --n {args.n} is more than the {doc['facts_known']} known facts; "
            f"all {doc['facts_traced']} were traced"
        )
    _out(f"ROME layer {rec['rome_layer']}; MEMIT/AlphaEdit layers {rec['memit_layers']}")
    _out(spec_hint(doc))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from memedit.demo import run_demo

    return run_demo(model=args.model, memory=args.memory, write=_out)


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from memedit.editable import EditableModel
    from memedit.integrations.server import serve

    keys = [*args.api_key, *filter(None, os.environ.get("MEMEDIT_API_KEYS", "").split(","))]
    if args.upstream_model and not args.upstream:
        raise InvalidRequestError("--upstream-model needs --upstream URL", field="upstream")
    if args.upstream:
        from memedit.integrations.upstream import OpenAIUpstream

        if args.model:
            msg = "--model and --upstream exclude each other: the upstream is the model"
            raise InvalidRequestError(msg, field="model", value=args.model)
        if not args.upstream_model:
            raise InvalidRequestError("--upstream needs --upstream-model NAME", field="upstream")
        key = os.environ.get("MEMEDIT_UPSTREAM_API_KEY") or None
        up = OpenAIUpstream(args.upstream, args.upstream_model, api_key=key)
        em = EditableModel.wrap_chat(up, memory=args.memory, url=args.url)
        model_id = args.upstream_model
    else:
        em = EditableModel.load(args.model, memory=args.memory, url=args.url)
        model_id = "memedit"
    serve(
        em,
        host=args.host,
        port=args.port,
        api_keys=keys,
        max_body_bytes=args.max_body_bytes,
        model_id=model_id,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memedit", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="edit facts in the default model and show the answers")
    demo.add_argument("--model", default=None, help="catalogue name, directory or hub id")
    demo.add_argument("--memory", default=None, help="memory directory (default: a fresh one)")
    demo.set_defaults(fn=_cmd_demo)

    models = sub.add_parser("models", help="the model catalogue")
    msub = models.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="list catalogue models")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(fn=_cmd_models_list)
    mp = msub.add_parser("pull", help="fetch, verify and convert a catalogue model")
    mp.add_argument("name")
    mp.add_argument("--quiet", action="store_true")
    mp.set_defaults(fn=_cmd_models_pull)

    def memory_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--memory", required=True, help="edit memory directory")
        sp.add_argument("--url", default=None, help="SQLAlchemy URL of the edit log")

    ask = sub.add_parser("ask", help="answer a question with the memory's edits applied")
    memory_args(ask)
    ask.add_argument("question")
    ask.add_argument("--model", default=None)
    ask.add_argument("--raw", action="store_true", help="complete the text, no chat template")
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.add_argument("--json", action="store_true", help="print the answer and the decision")
    ask.set_defaults(fn=_cmd_ask)

    edit = sub.add_parser("edit", help="add edits to a memory")
    memory_args(edit)
    edit.add_argument("--prompt")
    edit.add_argument("--target")
    edit.add_argument("--subject", default="")
    edit.add_argument("--file", help="JSON file with one request or a list of them")
    edit.add_argument(
        "--strategy",
        choices=("memory", "weights", "adapter"),
        default="memory",
        help="memory (retrieved at query time), weights (written into the model's weights) "
        "or adapter (held beside them, e.g. a GRACE codebook)",
    )
    edit.add_argument(
        "--method",
        default="",
        help="in-weight method: rome (default), memit, alphaedit, ft-m, ft-l; adapter: grace",
    )
    edit.add_argument("--options", default="", help="method options, e.g. 'layers=4;v_lr=0.5'")
    edit.add_argument("--model", default=None, help="model for --strategy weights/adapter")
    edit.set_defaults(fn=_cmd_edit)

    edits = sub.add_parser("edits", help="list a memory's edits")
    memory_args(edits)
    edits.add_argument("--all", action="store_true", help="include rolled-back edits")
    edits.set_defaults(fn=_cmd_edits)

    rb = sub.add_parser("rollback", help="undo one edit")
    memory_args(rb)
    rb.add_argument("edit_id", type=int)
    rb.add_argument("--model", default=None, help="model of an in-weight edit")
    rb.set_defaults(fn=_cmd_rollback)

    ev = sub.add_parser("eval", help="KnowEdit evaluation of editing strategies")
    ev.add_argument("--model", default=None, help="catalogue name, directory or hub id")
    ev.add_argument(
        "--dataset",
        action="append",
        help="dataset name(s), comma-separated or repeated; 'all' = the six KnowEdit datasets "
        "(also CounterFact, MQuAKE); default ZsRE",
    )
    ev.add_argument(
        "--strategies",
        default="memory",
        help="comma-separated specs: unedited, memory, adapter:METHOD, weights:METHOD[@k=v;...]",
    )
    ev.add_argument("--limit", type=int, default=None, help="first N records of each dataset")
    ev.add_argument(
        "--sequential",
        type=int,
        default=None,
        metavar="T",
        help="let T edits accumulate and score all of them (lifelong mode)",
    )
    ev.add_argument("--checkpoints", default=None, help="T values of the sequential curve")
    ev.add_argument(
        "--edit-batch",
        type=int,
        default=1,
        metavar="B",
        help="sequential mode: apply the records B at a time (one batched edit each)",
    )
    ev.add_argument("--out", default="eval-out", help="output directory (resumable)")
    ev.add_argument("--workers", type=int, default=1, help="worker processes (a GPU each)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--split",
        default="dev",
        choices=["dev", "train", "test"],
        help="which file of each dataset: dev (default), train, or test (the full release's)",
    )
    ev.add_argument(
        "--data-dir",
        default=None,
        help="KnowEdit directory (ours or the full release); default ../shared/knowedit",
    )
    ev.add_argument("--fluency-tokens", type=int, default=100)
    ev.add_argument(
        "--no-generation",
        action="store_true",
        help="teacher-forced metrics only (skip judging greedy generations)",
    )
    ev.add_argument(
        "--unrelated",
        default=None,
        metavar="SOURCE",
        help="fact datasets: also score locality on one unrelated question per record, the "
        "WISE paper's ZsRE locality; nq = Natural Questions of the ZsRE train file from "
        "record 64 on (0-63 are the methods' training pool)",
    )
    ev.add_argument("--verify-revert", default="sample", choices=["all", "sample", "none"])
    ev.add_argument("--report-only", action="store_true", help="rewrite reports from --out")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(fn=_cmd_eval)

    res = sub.add_parser("results", help="write RESULTS.md from evaluation directories")
    res.add_argument("dirs", nargs="+")
    res.add_argument("--write", default="RESULTS.md")
    res.add_argument("--notes", default=None, help="Markdown appended after the tables")
    res.set_defaults(fn=_cmd_results)
    loc = sub.add_parser("locate", help="causal tracing: where the model stores facts")
    loc.add_argument("--model", default=None, help="catalogue name, directory or hub id")
    loc.add_argument("--n", type=int, default=200, help="known facts to trace")
    loc.add_argument(
        "--facts",
        default="known_1000,counterfact",
        help="fact sources in order: known_1000 (the ROME paper's) and/or counterfact (the true "
        "facts of ROME's CounterFact split); only the ones the model answers are traced",
    )
    loc.add_argument("--out", default="docs/locate", help="heatmaps and effects.json go here")
    loc.add_argument("--samples", type=int, default=3, help="noise draws per fact")
    loc.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    loc.add_argument("--quiet", action="store_true", help="no progress bars")
    loc.set_defaults(fn=_cmd_locate)

    sv = sub.add_parser("serve", help="OpenAI-compatible chat + edits API over HTTP")
    sv.add_argument("--model", default=None, help="catalogue name, path or hub id")
    sv.add_argument("--memory", default=None, help="edit memory directory")
    sv.add_argument("--url", default=None, help="SQLAlchemy URL of the edit log")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", action="append", default=[], help="write key (repeatable)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20)
    sv.add_argument(
        "--upstream",
        default=None,
        help="OpenAI-compatible base URL to forward chats to (its API key from "
        "MEMEDIT_UPSTREAM_API_KEY); edits are placed in context for in-scope chats",
    )
    sv.add_argument("--upstream-model", default=None, help="model name sent to --upstream")
    sv.set_defaults(fn=_cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.fn(args))
    except (MemeditError, FileNotFoundError) as exc:
        sys.stderr.write(f"memedit: error: {exc}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
