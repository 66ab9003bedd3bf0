"""moto's S3 server, run as ``python -m tests.moto_s3 -H HOST -p PORT``, with two fixes to its signature check: it
canonicalises the query string it was given decoded (``prefix=run/``), where a client signed it encoded
(``prefix=run%2F``), so a listing under a prefix with a slash would be refused: its query is encoded again here, as
S3 itself does; and it checks only signatures in an Authorization header: a presigned URL's (in its query) is
checked here, as S3 itself does."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from moto import server
from moto.iam import access_control

QUERY_SIGNATURE = "X-Amz-Signature"


def _encoded(query: str) -> str:
    pairs = (pair.partition("=") for pair in query.split("&") if pair)
    return "&".join(f"{quote(unquote(k), safe='-_.~')}={quote(unquote(v), safe='-_.~')}" for k, _, v in pairs)


class _Request(access_control.S3IAMRequest):
    def __init__(
        self, account_id: str, method: str, path: str, data: dict, body: bytes, headers: Any, action: str
    ) -> None:
        self._query = dict(parse_qsl(path.partition("?")[2]))
        self._presigned = "Authorization" not in headers and QUERY_SIGNATURE in self._query
        if self._presigned:  # moto reads the key and the region from the header
            headers = {**dict(headers.items()), "Authorization": f"Credential={self._query['X-Amz-Credential']},"}
        super().__init__(account_id, method, path, data, body, headers, action)

    def _create_aws_request(self):
        path, _, query = self._path.partition("?")
        if query:
            self._path = f"{path}?{_encoded(query)}"
        return super()._create_aws_request()

    def check_signature(self) -> None:
        if not self._presigned:
            return super().check_signature()
        signed = {name: value for name, value in self._query.items() if name != QUERY_SIGNATURE}
        url = f"http://{self._headers['Host']}{self._path.partition('?')[0]}?{urlencode(signed, quote_via=quote)}"
        request = AWSRequest(method=self._method, url=url, headers={})
        request.context["timestamp"] = signed["X-Amz-Date"]
        auth = S3SigV4QueryAuth(self._access_key.create_credentials(), "s3", self._region, int(signed["X-Amz-Expires"]))
        canonical = auth.canonical_request(request)
        if auth.signature(auth.string_to_sign(request, canonical), request) != self._query[QUERY_SIGNATURE]:
            self._raise_signature_does_not_match()
        return None


access_control.S3IAMRequest = _Request

if __name__ == "__main__":
    server.main()
