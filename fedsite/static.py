"""Static files through WhiteNoise, without pushing the rest of the middleware chain into threads.

WhiteNoise's middleware is sync-only. One sync-only middleware in an async (ASGI) chain makes Django
adapt the whole chain: every request, a waiting long-poll included, then runs in a thread of its own.
:class:`AsyncWhiteNoiseMiddleware` keeps WhiteNoise's semantics (the same file lookup, headers, caching
and finders) and is both sync- and async-capable: under ASGI, a request that is not for a static file
costs one dictionary lookup (or a prefix test, with ``autorefresh``) on the event loop, and only static
files touch the file system, in a worker thread.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponseBase
from whitenoise.middleware import WhiteNoiseMiddleware


class AsyncWhiteNoiseMiddleware(WhiteNoiseMiddleware):
    """:class:`whitenoise.middleware.WhiteNoiseMiddleware`, async-capable (see the module docstring)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any = None, **kwargs: Any) -> None:
        super().__init__(get_response, **kwargs)
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self._is_async:
            return self.__acall__(request)
        return super().__call__(request)

    def _may_be_static(self, path: str) -> bool:
        """Whether ``find_file`` could find anything for ``path`` (it looks only under these prefixes)."""
        if self.use_finders and path.startswith(self.static_prefix):
            return True
        return any(path.startswith(prefix) for _, prefix in self.directories)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        path = request.path_info
        if self.autorefresh:
            static_file = (
                await sync_to_async(self.find_file, thread_sensitive=False)(path)
                if self._may_be_static(path)
                else None
            )
        else:
            static_file = self.files.get(path)
        if static_file is not None:
            return await sync_to_async(self.serve, thread_sensitive=False)(static_file, request)
        response: HttpResponseBase = await self.get_response(request)
        return response
