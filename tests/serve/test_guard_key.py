"""The API key check itself: equal keys match, any other string does not, whatever its length."""

from llmrun.serve.guard import key_matches


def test_only_the_key_itself_matches():
    assert key_matches("s3cret", "s3cret")
    for other in ("", "s3cre", "s3cret ", "S3cret", "s3cret" * 50, "\u00e9"):
        assert not key_matches(other, "s3cret"), other
