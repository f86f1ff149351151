"""The rules engine: compile a route's ``when:`` mapping once, evaluate it per instance.

See ``docs/rules.md`` for the rule language as PACS admins read it.
"""

from .compiler import OPERATORS, compile_condition
from .conditions import AllOf, Always, AnyOf, Condition, Exists, Match, Not
from .errors import RuleError
from .facts import InstanceFacts
from .fields import PSEUDO_KEYS, suggest_keyword
from .lint import never_matches

__all__ = [
    "OPERATORS",
    "PSEUDO_KEYS",
    "AllOf",
    "Always",
    "AnyOf",
    "Condition",
    "Exists",
    "InstanceFacts",
    "Match",
    "Not",
    "RuleError",
    "compile_condition",
    "never_matches",
    "suggest_keyword",
]
