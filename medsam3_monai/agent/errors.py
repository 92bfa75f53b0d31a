"""Errors of the agent. Every one is a ``ValueError``: ``medsam3`` reports it in one line and exits 2."""

from __future__ import annotations

__all__ = ["AgentError", "EndpointUnreachable", "PlannerError", "ToolSupportMissing"]


class AgentError(ValueError):
    """The agent could not produce an answer (bad request, exhausted budget, planner failure)."""


class PlannerError(AgentError):
    """The planner endpoint failed: HTTP errors, time-outs after the retries, refused requests."""


class EndpointUnreachable(PlannerError):
    """No connection to the planner endpoint at all (refused, unknown host): the offline planner may take over."""


class ToolSupportMissing(PlannerError):
    """The endpoint rejected a request because it offered tools (function calling is not enabled there)."""
