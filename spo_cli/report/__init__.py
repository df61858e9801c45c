"""`spo report`: learning curves of several runs (curves.png) and one self-contained page (report.html) with those
curves, a summary table and the credit-assignment view of sampled responses."""

from __future__ import annotations

import base64
import contextlib
import html
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from spo_cli.errors import SpoUserError
from spo_cli.fsutil import atomic_write_text
from spo_cli.report.credit import CSS, credit_section, pick_episodes
from spo_cli.report.curves import PNG_SOFTWARE, RunCurves, plot_credit, plot_curves, read_curves

# How every report.html spo writes begins: what marks an existing one as spo's, to be replaced.
HTML_HEAD = "<!doctype html><html><head><meta charset='utf-8'><title>spo report</title>"


def parse_run_args(args: Sequence[str]) -> list[tuple[str, Path]]:
    """RUN_DIR or LABEL=RUN_DIR; runs sharing a label are seeds of one method (drawn as mean and band).
    A bare directory is labelled by its name, with its parent's name prepended when two names clash."""
    runs = []
    for arg in args:
        label, sep, path = arg.partition("=")
        runs.append((label if sep else None, Path(path if sep else arg)))
    names = [p.name for label, p in runs if label is None]
    out = []
    for label, path in runs:
        if not path.is_dir():
            raise SpoUserError(f"{path}: no such run directory")
        if label is None:
            label = path.name if names.count(path.name) == 1 else f"{path.parent.name}/{path.name}"
        out.append((label, path))
    return out


def write_report(
    runs: Sequence[tuple[str, Path]],
    out_dir: Path,
    *,
    iteration: int | None = None,
    episodes_per_run: int = 4,
    low_prob: float | None = None,
    smooth: int = 0,
    accuracy: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """curves.png and report.html in `out_dir`; returns their paths. `accuracy`: "greedy" or "sampled" held-out
    accuracy (default greedy where a run has it).

    An earlier report in `out_dir` is replaced, each file atomically; a file of that name that spo did not write
    is refused (SpoUserError), and so is an `out_dir` that is a file.
    """
    check_out_dir(out_dir)
    groups: dict[str, list[RunCurves]] = {}
    for label, run_dir in runs:
        groups.setdefault(label, []).append(read_curves(run_dir, label, accuracy))
    curves_png = out_dir / "curves.png"
    with _writing(out_dir):
        plot_curves(groups, curves_png, smooth=smooth)
    log(f"wrote {curves_png}")
    written = {"curves": curves_png}
    if any(c.credit for runs in groups.values() for c in runs):
        written["credit"] = out_dir / "credit.png"
        with _writing(out_dir):
            plot_credit(groups, written["credit"], smooth=smooth)
        log(f"wrote {written['credit']}")
    sections = []
    for label, run_dir in runs:
        sections.append(_credit_for_run(label, run_dir, iteration, episodes_per_run, low_prob))
    page = (
        f"{HTML_HEAD}<style>{CSS}</style></head><body><h1>spo report</h1>"
        f"{_summary_table(groups)}{_image(curves_png, 'learning curves')}"
        f"{_credit_metrics_section(written.get('credit'))}"
        "<h1>Credit assignment</h1><p class='meta'>Sampled responses as they were trained: each token coloured by its "
        "advantage, bars at segment starts, underlined tokens had low probability under the sampling policy, and a "
        "boxed token is where a wrong response first departed from the correct solution (where the task knows it)."
        f"</p>{''.join(sections)}</body></html>\n"
    )
    written["html"] = out_dir / "report.html"
    with _writing(out_dir):
        atomic_write_text(written["html"], page)
    log(f"wrote {written['html']}")
    return written


def _image(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode()
    return f"<img alt='{alt}' style='max-width: 100%' src='data:image/png;base64,{data}'>"


def _credit_metrics_section(png: Path | None) -> str:
    if png is None:
        return ""
    return (
        "<h2>Credit against ground truth</h2><p class='meta'>On wrong responses whose first wrong token the task "
        "knows: <b>misplaced blame</b>, the share of the negative advantage on tokens before the first error (dashed: "
        "the share of tokens there, what one advantage per response scores; 0 is ideal), and <b>localization</b>, "
        "the share whose most negative segment holds the first wrong token (a single segment per response holds it "
        "trivially). See spo_cli/credit.py.</p>" + _image(png, "credit metrics")
    )


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output directory that is a file, or whose curves.png or report.html spo did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SpoUserError(
            f"--out {out_dir}: is a file; --out names the directory that spo report writes curves.png and "
            "report.html into"
        )
    html_file, png, credit_png = out_dir / "report.html", out_dir / "curves.png", out_dir / "credit.png"
    ours = _starts_with(html_file, HTML_HEAD.encode())
    # A curves.png from spo versions before its marker is recognised by the spo report.html beside it.
    checks = ((html_file, ours), (png, ours or _has_png_text(png, PNG_SOFTWARE)), (credit_png, _has_png_text(credit_png, PNG_SOFTWARE)))
    for path, written_by_spo in checks:
        if path.exists() and not written_by_spo:
            raise SpoUserError(
                f"--out {out_dir}: {path} is not a file spo report wrote; move it away or choose another --out"
            )


def _starts_with(path: Path, head: bytes) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(len(head)) == head


def _has_png_text(path: Path, text: str) -> bool:
    """Whether a PNG holds a text chunk with `text` (matplotlib writes them before the image data, near the start)."""
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        head = fh.read(4096)
    return head.startswith(b"\x89PNG") and text.encode() in head


@contextlib.contextmanager
def _writing(out_dir: Path) -> Iterator[None]:
    """A directory the user cannot write to is their error to fix, with the flag that fixes it."""
    try:
        yield
    except PermissionError as exc:
        raise SpoUserError(
            f"{out_dir}: {exc.strerror or 'Permission denied'}: cannot write the report there; "
            "pass --out with a directory you can write to"
        ) from None


def _summary_table(groups: dict[str, list[RunCurves]]) -> str:
    rows = []
    for label, runs in groups.items():
        for c in runs:
            first = f"{c.accuracy.values[0]:.3f}" if c.accuracy.values else ""
            last = f"{c.accuracy.values[-1]:.3f}" if c.accuracy.values else ""
            iters = int(c.reward.iterations[-1]) if c.reward.iterations else 0
            seconds = f"{c.reward.seconds[-1]:.0f}" if c.reward.seconds else ""
            credit = "".join(f"<td>{_run_mean(c, key)}</td>" for key in ("credit/misplaced_blame", "credit/localization"))
            rows.append(
                f"<tr><td style='text-align:left'>{html.escape(label)}</td><td style='text-align:left'>{html.escape(str(c.run_dir))}</td>"
                f"<td>{iters}</td><td>{seconds}</td><td>{first}</td><td>{last}</td>{credit}</tr>"
            )
    return (
        "<table><tr><th>run</th><th>directory</th><th>iterations</th><th>wall time (s)</th>"
        "<th>held-out accuracy, first</th><th>last</th><th>misplaced blame (mean)</th><th>localization (mean)</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _run_mean(curves: RunCurves, key: str) -> str:
    values = curves.credit[key].values if key in curves.credit else []
    return f"{sum(values) / len(values):.3f}" if values else ""


def _credit_for_run(label: str, run_dir: Path, iteration: int | None, count: int, low_prob: float | None) -> str:
    from spo_cli.episode import iter_episodes

    files = sorted((run_dir / "episodes").glob("iter_*.jsonl"))
    if iteration is not None:
        files = [f for f in files if f.name == f"iter_{iteration:06d}.jsonl"]
    if not files:
        what = f"iteration {iteration}" if iteration is not None else "any iteration"
        return f"<h2>{html.escape(label)}</h2><p>no saved episodes for {what} in {html.escape(str(run_dir / 'episodes'))}</p>"
    path = files[-1]
    episodes = pick_episodes(list(iter_episodes(path)), count)
    recipe = _resolved_recipe(run_dir)
    threshold = low_prob if low_prob is not None else _default_low_prob(recipe)
    title = f"{label}: {path.name.removesuffix('.jsonl').replace('_', ' ')} ({run_dir})"
    return credit_section(title, episodes, _tokenizer(run_dir, recipe), threshold, _tool_markers(recipe))


def _tool_markers(recipe: dict):
    """The run's tool-call markers (sampling.tools), the defaults when the run had none or an older recipe."""
    from spo_cli.tools.calls import ToolMarkers

    tools = _section(_section(recipe, "sampling"), "tools")
    fields = ("code_start", "code_end", "output_start", "output_end")
    return ToolMarkers(**{name: tools[name] for name in fields if isinstance(tools.get(name), str)})


def _resolved_recipe(run_dir: Path) -> dict:
    """The run's recipe as plain data (not validated: an older spo may have written it), read with the recipe
    loader's limits (a binary, huge or deeply nested file is a SpoUserError naming it); {} when there is none."""
    from spo_cli.recipe import read_recipe_yaml

    path = run_dir / "recipe.resolved.yaml"
    if not path.is_file():
        return {}
    loaded = read_recipe_yaml(path)
    return loaded if isinstance(loaded, dict) else {}


def _section(recipe: dict, name: str) -> dict:
    """A section of a resolved recipe; {} when it is missing or not a mapping (a layout of another spo version)."""
    section = recipe.get(name)
    return section if isinstance(section, dict) else {}


def _default_low_prob(recipe: dict) -> float:
    """SPO-chain's cutpoint threshold rho when the run used it (its cutpoints are exactly such tokens), else 0.5."""
    partitioner = _section(recipe, "partitioner")
    rho = partitioner.get("rho", 0.9)
    if partitioner.get("kind") == "cutpoint" and isinstance(rho, int | float) and 0 < rho <= 1:
        return float(rho)
    return 0.5


def _tokenizer(run_dir: Path, recipe: dict):
    from spo_cli.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    for candidate in ([ckpt / "model"] if ckpt else []) + [run_dir / "warm_start"]:
        if (candidate / "tokenizer_config.json").is_file():
            from spo_cli.models import load_tokenizer

            return load_tokenizer(candidate)
    if _section(recipe, "model").get("kind") == "tiny":
        from spo_cli.models import build_byte_tokenizer

        return build_byte_tokenizer()
    raise SpoUserError(f"{run_dir}: no tokenizer to decode its episodes (no checkpoint or warm_start directory)")
