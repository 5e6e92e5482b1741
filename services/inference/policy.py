"""Per-tenant model policy: which models a tenant may call, as which pinned version, how large.

No grpc imports. The store loads a tenant's Policy and PrivateModels; `resolve` decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from shared.errors import clip

_NAME = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,99}$")


class PolicyViolation(Exception):
    """A request the tenant's policy does not allow; `field` names the request field."""

    def __init__(self, field: str, message: str, *, reason: str):
        super().__init__(message)
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Policy:
    """A tenant's model policy (empty fields fall back to the platform defaults)."""

    allowed_models: tuple[str, ...] = ()
    """Names and aliases the tenant may call; empty means the platform's list."""
    default_model: str = ""
    """Model used when a request names none."""
    pinned_versions: dict[str, str] = field(default_factory=dict)
    """Alias -> pinned upstream version."""
    max_tokens_ceiling: int = 0
    """Highest max_tokens; 0 means the platform's."""

    def with_defaults(self, platform: Policy) -> Policy:
        """This policy with every unset field taken from the platform's."""
        return Policy(
            allowed_models=self.allowed_models or platform.allowed_models,
            default_model=self.default_model or platform.default_model,
            pinned_versions={**platform.pinned_versions, **self.pinned_versions},
            max_tokens_ceiling=self.max_tokens_ceiling or platform.max_tokens_ceiling,
        )


@dataclass(frozen=True)
class PrivateModel:
    """A model registered by one tenant; only that tenant can call it."""

    name: str
    """What the tenant calls it."""
    upstream_model: str
    """The upstream model id (a fine-tune id, say)."""
    base_url: str = ""
    """The tenant's own Messages API endpoint, or empty for the platform's."""
    lineage: str = ""
    """What it was trained on and from what."""
    create_time: str = ""


@dataclass(frozen=True)
class ResolvedModel:
    """What a call will really use."""

    requested: str
    """The name or alias the caller gave (or the default)."""
    upstream_model: str
    """The pinned version sent upstream."""
    base_url: str = ""
    """A private model's own endpoint; empty for the platform's."""
    private: bool = False


def resolve(requested: str, policy: Policy, private: dict[str, PrivateModel]) -> ResolvedModel:
    """The model a call may use, or PolicyViolation. `policy` must already carry the defaults.

    A private model is found only among the caller's own; an unknown name and another tenant's
    private model get the same answer, so nothing leaks about what other tenants registered.
    """
    name = requested or policy.default_model
    if not name:
        raise PolicyViolation(
            "params.model", "no model given and the tenant has no default model", reason="MODEL_REQUIRED"
        )
    if name in private:
        model = private[name]
        return ResolvedModel(name, model.upstream_model, model.base_url, private=True)
    if name not in policy.allowed_models:
        # Echo clipped: 400 characters of 3-byte text overflowed the 1 KB error details (fuzzer).
        raise PolicyViolation(
            "params.model", f"model {clip(repr(name), 100)} is not allowed for this tenant", reason="MODEL_NOT_ALLOWED"
        )
    return ResolvedModel(name, policy.pinned_versions.get(name, name))


def cap_max_tokens(max_tokens: int, policy: Policy) -> int:
    """The request's max_tokens checked against the ceiling (PolicyViolation when over or unset)."""
    if max_tokens <= 0:
        raise PolicyViolation("params.max_tokens", "must be positive", reason="INVALID_MAX_TOKENS")
    if policy.max_tokens_ceiling and max_tokens > policy.max_tokens_ceiling:
        raise PolicyViolation(
            "params.max_tokens",
            f"max_tokens {max_tokens} is above this tenant's ceiling of {policy.max_tokens_ceiling}",
            reason="MAX_TOKENS_ABOVE_CEILING",
        )
    return max_tokens


def check_policy(policy: Policy) -> dict[str, str]:
    """Field violations of a policy an operator wants to set (empty when it is valid)."""
    problems: dict[str, str] = {}
    for i, name in enumerate(policy.allowed_models):
        if not _NAME.match(name):
            problems[f"policy.allowed_models[{i}]"] = "lower-case letters, digits and ._:- only"
    if policy.default_model and policy.allowed_models and policy.default_model not in policy.allowed_models:
        problems["policy.default_model"] = "must be one of allowed_models"
    for alias, version in policy.pinned_versions.items():
        if not _NAME.match(alias) or not _NAME.match(version):
            problems[f"policy.pinned_versions[{alias}]"] = "alias and version must be model names"
    if policy.max_tokens_ceiling < 0:
        problems["policy.max_tokens_ceiling"] = "must not be negative"
    return problems


def check_private_model(model: PrivateModel, *, allow_http: bool = False) -> dict[str, str]:
    """Field violations of a private model to register (empty when it is valid)."""
    problems: dict[str, str] = {}
    if not _NAME.match(model.name):
        problems["model.name"] = "1-100 lower-case letters, digits and ._:- only"
    if not model.upstream_model or len(model.upstream_model) > 200:
        problems["model.upstream_model"] = "is required (at most 200 characters)"
    scheme = "https?" if allow_http else "https"
    if model.base_url and not re.match(rf"^{scheme}://[^\s/?#@]+(/[^\s]*)?$", model.base_url):
        problems["model.base_url"] = "must be an https URL" + (" (or http)" if allow_http else "")
    if len(model.lineage) > 4000:
        problems["model.lineage"] = "at most 4000 characters"
    return problems
