"""The one exception type for bad user input: printed as ``error: <option>: <why>``, exit 2."""


class UserError(Exception):
    def __init__(self, option: str, why: str):
        super().__init__(f"{option}: {why}")
        self.option, self.why = option, why
