"""moto's S3 server, run as ``python -m tests.moto_s3 -H HOST -p PORT``, with one fix to its signature check: it
canonicalises the query string it was given decoded (``prefix=run/``), where a client signed it encoded
(``prefix=run%2F``), so a listing under a prefix with a slash would be refused. Its query is encoded again here,
as S3 itself does."""

from __future__ import annotations

from urllib.parse import quote, unquote

from moto import server
from moto.iam import access_control


def _encoded(query: str) -> str:
    pairs = (pair.partition("=") for pair in query.split("&") if pair)
    return "&".join(f"{quote(unquote(k), safe='-_.~')}={quote(unquote(v), safe='-_.~')}" for k, _, v in pairs)


class _Request(access_control.S3IAMRequest):
    def _create_aws_request(self):
        path, _, query = self._path.partition("?")
        if query:
            self._path = f"{path}?{_encoded(query)}"
        return super()._create_aws_request()


access_control.S3IAMRequest = _Request

if __name__ == "__main__":
    server.main()
