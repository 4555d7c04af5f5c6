"""`lorafleet demo`: the whole pipeline once, on the embedded default, with visible progress.

finetune flow (prepare → train → evaluate → register → promote) → `bentoml serve` in the background
→ the same chat questions to the base model and to the new champion over HTTP → answers side by side
and the evaluation table → server stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from lorafleet.config import load_config
from lorafleet.evaluation.report import comparison_markdown
from lorafleet.settings import Settings
from lorafleet.tasks.data.prepare import PreparedData

N_QUESTIONS = 3


def run_demo(config_path: Path, settings: Settings, *, port: int | None, console: Console) -> dict:
    from lorafleet.flows.finetune import finetune
    from lorafleet.serving.launcher import start_server

    started = time.perf_counter()
    spec = load_config(config_path)
    console.rule(f"[bold]1/3 finetune flow: {spec.name} ({spec.method}) on {spec.base_model}")
    summary = finetune(config=str(Path(config_path).resolve()))
    console.print(Panel(comparison_markdown([(summary["labels"][k], v) for k, v in summary["metrics"].items()]),
                        title=f"evaluation on {summary['n_test_examples']} test rows"))
    console.print(f"version {summary['version']}: "
                  + ("[green]promoted to champion[/]" if summary["promoted"] else "[yellow]not promoted[/]")
                  + "".join(f"\n  - {r}" for r in summary["gate_reasons"]))

    console.rule("[bold]2/3 serving: bentoml serve with every champion adapter")
    questions = _questions(Path(summary["prepared_dir"]))
    with start_server(settings, port=port, log_file=settings.home / "demo-server.log") as server:
        console.print(f"server up at {server.url} (log: {settings.home / 'demo-server.log'})")
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()
        base_id = next(m["id"] for m in models["data"] if m.get("owned_by") == "base" or m["id"] == spec.base_model)
        console.print("models served: " + ", ".join(m["id"] for m in models["data"]))
        console.rule("[bold]3/3 the same questions to the base model and to the adapter (chat completions)")
        for number, question in enumerate(questions, 1):
            answers = Table.grid(padding=(0, 2))
            answers.add_column(style="bold", no_wrap=True)
            answers.add_column(overflow="fold")
            answers.add_row("input", question["input"])
            answers.add_row("reference", question["reference"])
            for label, model in ((f"base ({base_id})", base_id), (f"adapter ({spec.name})", spec.name)):
                answer = _ask(server.url, model, question["messages"], spec.evaluation.max_new_tokens)
                verdict = "[green]= reference[/]" if answer.strip() == question["reference"].strip() else ""
                answers.add_row(label, _clip(answer) + (f"  {verdict}" if verdict else ""))
            console.print(Panel(answers, title=f"question {number}", title_align="left"))
    console.print(f"[bold green]demo finished in {time.perf_counter() - started:.0f} s[/]; "
                  f"state under {settings.home} (MLflow: {settings.tracking_uri})")
    return summary


def _questions(prepared_dir: Path) -> list[dict[str, str]]:
    """A few held-out test inputs (never seen in training) from the prepared data of this run."""
    rows = PreparedData.from_dir(prepared_dir).records("test")[-N_QUESTIONS:]
    return [{"messages": row["messages"], "input": row["messages"][-1]["content"], "reference": row["completion"]}
            for row in rows]


def _clip(text: str, limit: int = 240) -> str:
    """Base models ramble to max_tokens; keep the table readable."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + " …"


def _ask(url: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    """One chat request with the task's own prompt (system + user), the same for base and adapter."""
    response = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    body = response.json()
    if response.status_code != 200:
        return f"[error {response.status_code}] {body.get('error', {}).get('message')}"
    return body["choices"][0]["message"]["content"]
