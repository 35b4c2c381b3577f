"""The nightly run's status report, and its post to a chat webhook.

The pipeline's exit handler (``apem_kfp.components.notify``) calls these with KFP's
``PipelineTaskFinalStatus``: it runs whether the run succeeded, failed or was cancelled. The webhook
body is Slack-style JSON (``{"text": ...}``), which Slack and Teams incoming webhooks both accept.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass

WEBHOOK_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class RunStatus:
    state: str            # SUCCEEDED | FAILED | CANCELLED
    run_id: str           # KFP's pipeline job resource name
    task: str             # the task whose final status this is (the exit handler's group on KFP)
    error_code: int | None
    error_message: str
    window: tuple[str, str]  # first and last day of the data window

    @property
    def ok(self) -> bool:
        return self.state == "SUCCEEDED"


def render_status(status: RunStatus, pipeline_name: str) -> str:
    """The status as Markdown: what failed, its error, the run id and the data window."""
    icon = "OK" if status.ok else "ALERT"
    lines = [
        f"# {icon}: {pipeline_name} {status.state}", "",
        f"- run: `{status.run_id or 'unknown'}`",
        f"- data window: {status.window[0]} .. {status.window[1]}",
    ]
    if not status.ok:
        lines += [
            f"- failed task: `{status.task or 'unknown'}`",
            f"- error code: {status.error_code if status.error_code is not None else 'none'}",
            "", "## Error", "", "```", status.error_message or "(no message)", "```",
        ]
    return "\n".join(lines) + "\n"


def post_webhook(url: str, text: str, timeout: float = WEBHOOK_TIMEOUT_SECONDS) -> int | None:
    """POST ``{"text": text}`` to ``url``; return the HTTP status, or None when ``url`` is empty."""
    if not url:
        return None
    request = urllib.request.Request(url, data=json.dumps({"text": text}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status
