"""The refit settings (``reconstruct``, ``damping``, ``sequential``) and their rules, defined once.

The width, head and hidden requests check them where they are built; the pipeline's config checks its
keys with the same functions. :class:`Wording` only changes how an error names a setting: as a
keyword argument (``sequential=True``, "pass ...") or as the config file's key (``sequential: true``,
"set ..."), so each caller's message names what its user wrote.

Example:
    >>> RefitOptions(reconstruct=True).check_refit(calibrated=True)
    >>> RefitOptions(sequential=True).check_refit(calibrated=True, wording=CONFIG_KEYS)
    Traceback (most recent call last):
    ValueError: sequential: true applies to the refit: set reconstruct: true as well.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..names import DEFAULT_DAMPING
from .reconstruction import check_damping

__all__ = ["Wording", "ARGUMENTS", "CONFIG_KEYS", "RefitOptions", "check_refit_target"]


@dataclass(frozen=True)
class Wording:
    """How an error names a setting: ``config=False`` as a Python argument, ``True`` as a YAML key."""

    config: bool = False

    def setting(self, name: str, value: Any) -> str:
        """``sequential=True`` or ``sequential: true``.

        Example:
            >>> CONFIG_KEYS.setting("reconstruct", True), ARGUMENTS.setting("reconstruct", True)
            ('reconstruct: true', 'reconstruct=True')
        """
        return f"{name}: {json.dumps(value)}" if self.config else f"{name}={value!r}"

    @property
    def verb(self) -> str:
        """What the user does to a setting: set a key, pass an argument."""
        return "set" if self.config else "pass"


ARGUMENTS = Wording()
CONFIG_KEYS = Wording(config=True)


@dataclass
class RefitOptions:
    """Shared by width, head and hidden requests: refit the kept columns of down_proj / o_proj (or the
    stream's readers)."""

    reconstruct: bool = False
    damping: float = DEFAULT_DAMPING
    sequential: bool = False

    def check_refit(self, calibrated: bool, wording: Wording = ARGUMENTS) -> None:
        """The refit rules: booleans, a damping >= 0, ``sequential`` only with ``reconstruct``, and
        ``reconstruct`` only with calibration data.

        Example:
            >>> RefitOptions(reconstruct=True, damping=0.1).check_refit(calibrated=True)
        """
        if not isinstance(self.reconstruct, bool) or not isinstance(self.sequential, bool):
            raise ValueError(
                f"reconstruct and sequential must be True or False, got {self.reconstruct!r}, {self.sequential!r}."
            )
        check_damping(self.damping)
        w = wording
        if self.sequential and not self.reconstruct:
            raise ValueError(
                f"{w.setting('sequential', True)} applies to the refit: {w.verb} "
                f"{w.setting('reconstruct', True)} as well."
            )
        if self.reconstruct and not calibrated:
            raise ValueError(
                "reconstruct=True needs calibration data: pass dataloader= (batches of dicts with "
                "input_ids and attention_mask) or use reconstruct=False."
            )


def check_refit_target(
    reconstruct: bool, sequential: bool, refits: bool, wording: Wording = ARGUMENTS
) -> None:
    """Refuse ``reconstruct`` / ``sequential`` when nothing pruned has a refit (only blocks are removed).

    ``refits`` says whether the pruning asked for includes an axis with a refit (MLP width, heads,
    hidden dimension).

    Example:
        >>> check_refit_target(True, False, refits=False, wording=CONFIG_KEYS)
        Traceback (most recent call last):
        ValueError: reconstruct: true refits down_proj after MLP width pruning, o_proj after head pruning or the stream's readers after hidden pruning; removing whole blocks has nothing to refit (for depth: replace_with_linear: true replaces the removed run by a fitted map).
    """
    if (reconstruct is True or sequential is True) and not refits:
        raise ValueError(
            f"{wording.setting('reconstruct', True)} refits down_proj after MLP width pruning, o_proj after "
            "head pruning or the stream's readers after hidden pruning; removing whole blocks has nothing "
            f"to refit (for depth: {wording.setting('replace_with_linear', True)} replaces the removed run "
            "by a fitted map)."
        )
