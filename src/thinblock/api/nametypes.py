"""Name fields and path parameters of the API, checked by the engine's rule (``thinblock.names``)
so that a bad name is refused with the same sentence whatever carried it: ``invalid volume name
'a b': volume names are 1-63 characters of ...``, not pydantic's wording."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from .. import names
from ..names import NameRule

NAME_ERROR = "thinblock_name"  # the validation error type _describe_validation says alone


@dataclass(frozen=True)
class NameCheck:
    """``Annotated[str, NameCheck(rule)]``: refused unless ``rule`` accepts it, the rule in the
    OpenAPI schema."""

    rule: NameRule

    def validate(self, value: Any) -> str:
        problem = self.rule.problem(value)
        if problem is not None:
            # The message goes in through the context: a name may hold braces.
            raise PydanticCustomError(NAME_ERROR, "{problem}", {"problem": problem})
        return str(value)

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(self.validate)

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "type": "string",
            "minLength": 1,
            "maxLength": self.rule.max_length,
            "pattern": self.rule.json_pattern,
            "description": self.rule.sentence,
        }


VolumeName = Annotated[str, NameCheck(names.VOLUME)]
PoolName = Annotated[str, NameCheck(names.POOL)]
TokenName = Annotated[str, NameCheck(names.TOKEN)]
