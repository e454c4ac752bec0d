"""The one exception users see: a problem they can fix, printed without a traceback (exit 2)."""


class EdgebuildError(Exception):
    """A user-fixable problem: `what` went wrong and `fix` says how to repair it."""

    exit_code = 2

    def __init__(self, what: str, fix: str = ""):
        super().__init__(what)
        self.what = what
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.what}\n  fix: {self.fix}" if self.fix else self.what


class BudgetExceeded(Exception):
    """The build finished but its budget was violated (exit 1; artifacts and runs stay)."""

    exit_code = 1
