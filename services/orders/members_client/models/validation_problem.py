from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.validation_problem_errors_item import ValidationProblemErrorsItem


T = TypeVar("T", bound="ValidationProblem")


@_attrs_define
class ValidationProblem:
    """
    Attributes:
        status (int):
        title (str):
        type_ (str):  Default: 'about:blank'.
        detail (str | Unset):
        trace_id (str | Unset):
        errors (list[ValidationProblemErrorsItem] | Unset):
    """

    status: int
    title: str
    type_: str = "about:blank"
    detail: str | Unset = UNSET
    trace_id: str | Unset = UNSET
    errors: list[ValidationProblemErrorsItem] | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        status = self.status

        title = self.title

        type_ = self.type_

        detail = self.detail

        trace_id = self.trace_id

        errors: list[dict[str, Any]] | Unset = UNSET
        if not isinstance(self.errors, Unset):
            errors = []
            for errors_item_data in self.errors:
                errors_item = errors_item_data.to_dict()
                errors.append(errors_item)

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "status": status,
                "title": title,
                "type": type_,
            }
        )
        if detail is not UNSET:
            field_dict["detail"] = detail
        if trace_id is not UNSET:
            field_dict["trace_id"] = trace_id
        if errors is not UNSET:
            field_dict["errors"] = errors

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.validation_problem_errors_item import ValidationProblemErrorsItem

        d = dict(src_dict)
        status = d.pop("status")

        title = d.pop("title")

        type_ = d.pop("type")

        detail = d.pop("detail", UNSET)

        trace_id = d.pop("trace_id", UNSET)

        _errors = d.pop("errors", UNSET)
        errors: list[ValidationProblemErrorsItem] | Unset = UNSET
        if _errors is not UNSET:
            errors = []
            for errors_item_data in _errors:
                errors_item = ValidationProblemErrorsItem.from_dict(errors_item_data)

                errors.append(errors_item)

        validation_problem = cls(
            status=status,
            title=title,
            type_=type_,
            detail=detail,
            trace_id=trace_id,
            errors=errors,
        )

        validation_problem.additional_properties = d
        return validation_problem

    @property
    def additional_keys(self) -> list[str]:
        return list(self.additional_properties.keys())

    def __getitem__(self, key: str) -> Any:
        return self.additional_properties[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.additional_properties[key] = value

    def __delitem__(self, key: str) -> None:
        del self.additional_properties[key]

    def __contains__(self, key: str) -> bool:
        return key in self.additional_properties
