"""Contains all the data models used in inputs/outputs"""

from .member_in import MemberIn
from .member_out import MemberOut
from .member_page import MemberPage
from .member_patch import MemberPatch
from .problem import Problem
from .validation_error import ValidationError
from .validation_error_context import ValidationErrorContext
from .validation_problem import ValidationProblem
from .validation_problem_errors_item import ValidationProblemErrorsItem

__all__ = (
    "MemberIn",
    "MemberOut",
    "MemberPage",
    "MemberPatch",
    "Problem",
    "ValidationError",
    "ValidationErrorContext",
    "ValidationProblem",
    "ValidationProblemErrorsItem",
)
