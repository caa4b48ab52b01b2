"""The one exception type for bad user input: printed as ``error: <option>: <why>``, exit 2."""


class UserError(Exception):
    def __init__(self, option: str, why: str):
        super().__init__(f"{option}: {why}")
        self.option, self.why = option, why


def one_line(e: BaseException) -> str:
    """``<Type>: <first line of the message>`` (at most 300 characters): how an unexpected exception is reported."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__
