"""Aliases of registered models: ``candidate``, ``champion`` and ``previous``; promotion and rollback.

Promotion moves ``champion`` to a version and records the champion it replaced (tag
``previous_champion``), so repeated rollbacks walk back through the champions. Nothing is deleted.
"""

from __future__ import annotations

import logging

from mlflow.exceptions import MlflowException

from lora_pipeline.tracking import mlflow_client

logger = logging.getLogger(__name__)


#: Aliases the pipeline manages. ``candidate``: the newest version that passed the gate;
#: ``champion``: the version to serve; ``previous``: the champion before it (``rollback`` target).
CANDIDATE_ALIAS, CHAMPION_ALIAS, PREVIOUS_ALIAS = "candidate", "champion", "previous"
#: Model-version tag recording which version was champion before this one (the rollback chain).
PREVIOUS_CHAMPION_TAG = "previous_champion"


class PromotionError(RuntimeError):
    """A promotion or rollback cannot be done (unknown version, no previous champion)."""


def version_by_alias(tracking_uri: str, name: str, alias: str) -> str | None:
    """The version number behind ``name@alias``, or None when the alias (or the model) does not exist."""
    try:
        return str(mlflow_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def aliases(tracking_uri: str, name: str) -> dict[str, str]:
    """Every alias of a registered model: ``{alias: version}``."""
    return {alias: str(version) for alias, version in mlflow_client(tracking_uri).get_registered_model(name).aliases.items()}


def set_candidate(tracking_uri: str, name: str, version: str) -> None:
    """Point ``candidate`` at a version that passed the gate."""
    mlflow_client(tracking_uri).set_registered_model_alias(name, CANDIDATE_ALIAS, version)


def promote(tracking_uri: str, name: str, version: str, *, force: bool = False, reason: str | None = None,
            by: str | None = None) -> dict[str, str | None]:
    """Move ``champion`` to ``version``; the old champion becomes ``previous`` (one-command rollback).

    Promoting the current champion again changes nothing. A version whose gate failed (tag
    ``gate_passed`` = ``False``) is only promoted with ``force``. ``reason`` and ``by`` are recorded on
    the version (tags ``promotion_reason``, ``promoted_by``).

    Returns:
        ``{"champion": version, "previous": old champion or None}``.

    Raises:
        PromotionError: the version does not exist, or failed the gate and ``force`` is not set.
    """
    client = mlflow_client(tracking_uri)
    try:
        model_version = client.get_model_version(name, version)
    except MlflowException as exc:
        raise PromotionError(f"{name} has no version {version}") from exc
    if model_version.tags.get("gate_passed") == "False" and not force:
        raise PromotionError(f"{name} version {version} failed the gate ({model_version.tags.get('gate_reasons', '')}); "
                             "promote it anyway with force (CLI: --force)")
    for key, value in (("promotion_reason", reason), ("promoted_by", by)):
        if value:
            client.set_model_version_tag(name, version, key, value)
    current = version_by_alias(tracking_uri, name, CHAMPION_ALIAS)
    if current == str(version):
        return {"champion": str(version), "previous": version_by_alias(tracking_uri, name, PREVIOUS_ALIAS)}
    if current is not None:
        client.set_model_version_tag(name, version, PREVIOUS_CHAMPION_TAG, current)
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, current)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    logger.info("promoted %s version %s to champion (previous: %s)", name, version, current)
    return {"champion": str(version), "previous": current}


def rollback(tracking_uri: str, name: str) -> dict[str, str | None]:
    """Make ``previous`` the champion again; ``previous`` then moves one step further back.

    The rolled-back version keeps its number and artefacts (nothing is deleted); it is tagged
    ``rolled_back`` so the registry shows why it stopped serving.

    Returns:
        ``{"champion": restored version, "previous": the one before it or None, "rolled_back": version}``.

    Raises:
        PromotionError: there is no champion or no previous champion.
    """
    client = mlflow_client(tracking_uri)
    current = version_by_alias(tracking_uri, name, CHAMPION_ALIAS)
    restored = version_by_alias(tracking_uri, name, PREVIOUS_ALIAS)
    if current is None or restored is None:
        raise PromotionError(f"{name}: nothing to roll back to (champion={current}, previous={restored})")
    client.set_registered_model_alias(name, CHAMPION_ALIAS, restored)
    client.set_model_version_tag(name, current, "rolled_back", "true")
    before = client.get_model_version(name, restored).tags.get(PREVIOUS_CHAMPION_TAG)
    if before == current:  # it replaced the version being rolled back: the chain ends here
        before = None
    if before:
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, before)
    else:
        client.delete_registered_model_alias(name, PREVIOUS_ALIAS)
    logger.info("rolled %s back from version %s to %s", name, current, restored)
    return {"champion": restored, "previous": before or None, "rolled_back": current}
