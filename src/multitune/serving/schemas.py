"""The request and answer bodies of the HTTP API. The request models are built per app from its engine's
input schemas and its limits, so that the OpenAPI document shows each task's record and the bounds it enforces;
a record itself is any JSON object here, checked by runs/predict.py's checked_input (as `multitune predict`)."""

# no `from __future__ import annotations`: pydantic reads the annotations of models built in functions at runtime
import re
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model, field_validator, model_validator

from multitune.serving.engine import Engine
from multitune.serving.settings import ServeSettings

Record = dict[str, Any]


class PredictBody(Protocol):
    """What the routes read of a TaskPredictRequest (its class is built per app)."""

    inputs: list[Record] | None

    def records(self) -> list[Record]: ...


class MixedItem(Protocol):
    task: str
    input: Record


class MixedBody(Protocol):
    inputs: list[MixedItem]


class GenerateBody(Protocol):
    input: Record
    stream: bool


@dataclass(frozen=True)
class RequestModels:
    """One app's request bodies: the shared ones (every task's record) and, per task, its own."""

    task_predict: type[BaseModel]
    mixed_predict: type[BaseModel]
    generate: type[BaseModel]
    engine: Engine
    limits: ServeSettings

    def own(self, name: str) -> tuple[type[BaseModel], type[BaseModel]]:
        """The predict and generate bodies of one task's own routes: the same checks, its record schema."""
        record = shown_as([self.engine.schemas[name].json_schema()])
        stem = "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9A-Za-z]+", name) if part)
        predict_body = create_model(
            f"{stem}PredictRequest",
            __base__=self.task_predict,
            inputs=(list[record] | None, Field(None, min_length=1, max_length=self.limits.max_inputs)),  # type: ignore[valid-type]
            input=(record | None, None),
        )
        generate_body = create_model(f"{stem}GenerateRequest", __base__=self.generate, input=(record, ...))
        return predict_body, generate_body


def request_models(engine: Engine, limits: ServeSettings) -> RequestModels:
    every_record = shown_as([engine.schemas[name].json_schema() for name in engine.tasks])
    return RequestModels(
        task_predict=task_predict_request(every_record, limits),
        mixed_predict=mixed_predict_request(engine, limits),
        generate=generate_request(every_record, limits),
        engine=engine,
        limits=limits,
    )


def shown_as(schemas: list[dict[str, Any]]) -> Any:
    """A record type whose OpenAPI schema is that of its task(s); it is checked by runs/predict.py's checked_input."""
    return Annotated[Record, WithJsonSchema(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})]


def checked_size(record: Record, max_chars: int) -> Record:
    """The record, unless its text (strings, and strings in lists) is over `max_chars` characters."""
    size = sum(
        len(item)
        for value in record.values()
        for item in (value if isinstance(value, list) else [value])
        if isinstance(item, str)
    )
    if size > max_chars:
        raise ValueError(f"an input holds {size} characters of text; at most {max_chars} are allowed")
    return record


def task_predict_request(every_record: Any, limits: ServeSettings) -> type[BaseModel]:
    class TaskPredictRequest(BaseModel):
        """Inputs of one task: a list of records, or one record."""

        model_config = ConfigDict(extra="forbid")
        inputs: list[every_record] | None = Field(  # type: ignore[valid-type]
            None, min_length=1, max_length=limits.max_inputs
        )
        input: every_record | None = None  # type: ignore[valid-type]

        @field_validator("inputs")
        @classmethod
        def _sizes(cls, value: list[Record] | None) -> list[Record] | None:
            return None if value is None else [checked_size(v, limits.max_chars) for v in value]

        @field_validator("input")
        @classmethod
        def _size(cls, value: Record | None) -> Record | None:
            return None if value is None else checked_size(value, limits.max_chars)

        @model_validator(mode="after")
        def _one_of(self) -> "TaskPredictRequest":
            if (self.inputs is None) == (self.input is None):
                raise ValueError("give either 'inputs' (a list of records) or 'input' (one record)")
            return self

        def records(self) -> list[Record]:
            return self.inputs if self.inputs is not None else [self.input or {}]

    return TaskPredictRequest


def mixed_predict_request(engine: Engine, limits: ServeSettings) -> type[BaseModel]:
    class TaskInput(BaseModel):
        model_config = ConfigDict(extra="forbid")
        task: str
        input: Record

        @field_validator("input")
        @classmethod
        def _size(cls, value: Record) -> Record:
            return checked_size(value, limits.max_chars)

    each_task_input = {  # /v1/predict's items as the OpenAPI document shows them: one shape per task
        "oneOf": [
            {
                "type": "object",
                "properties": {"task": {"const": name}, "input": engine.schemas[name].json_schema()},
                "required": ["task", "input"],
                "additionalProperties": False,
            }
            for name in engine.tasks
        ]
    }

    class MixedPredictRequest(BaseModel):
        """Inputs of several tasks, each naming its task; answered in the same order."""

        model_config = ConfigDict(extra="forbid")
        inputs: list[Annotated[TaskInput, WithJsonSchema(each_task_input)]] = Field(
            min_length=1, max_length=limits.max_inputs
        )

    return MixedPredictRequest


def generate_request(every_record: Any, limits: ServeSettings) -> type[BaseModel]:
    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        input: every_record  # type: ignore[valid-type]
        stream: bool = False

        @field_validator("input")
        @classmethod
        def _size(cls, value: Record) -> Record:
            return checked_size(value, limits.max_chars)

    return GenerateRequest


# the answers: one prediction as `multitune predict` gives it (`probabilities` for a classification, `raw`
# beside a regression's held value, ...), alone or tagged with its task


class Prediction(BaseModel):
    model_config = ConfigDict(extra="allow")
    prediction: Any
    probabilities: dict[str, float] | None = None


class TaskPredictResponse(BaseModel):
    task: str
    predictions: list[Prediction]


class MixedPrediction(Prediction):
    task: str


class MixedPredictResponse(BaseModel):
    predictions: list[MixedPrediction]
