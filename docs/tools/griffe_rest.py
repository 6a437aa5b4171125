"""A griffe extension for the operator's guide's API page (mkdocs.yml):
fastfc's docstrings are written for Sphinx (numpydoc sections, reST roles
such as ``:class:`~fastfc.Volume```); Markdown shows a role as its raw
text, so each role becomes a code span of the name a reader sees
(``Volume``; the whole path without the ``~``)."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|exc|mod|obj|const):`(~?)([^`]+)`")


def plain(text: str) -> str:
    """``text`` with every reST role spelled as a Markdown code span."""
    return ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`",
                    text)


class ReSTRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
