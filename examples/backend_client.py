#!/usr/bin/env python3
"""A backend's daemon-proxy client, as agent platforms wrote it for the old Python service.

It injects previewd's daemon into a container, asks for a preview of a port the app serves
on the container's 127.0.0.1, fetches the returned URL as a user's browser would (resolving
``*.localhost`` to loopback), then revokes the preview and removes the daemon.

Usage: backend_client.py API_URL CONTAINER PORT   (PREVIEWD_API_TOKEN is sent when set)
"""

import asyncio
import os
import socket
import sys

import aiohttp
from aiohttp.abc import AbstractResolver


class LocalhostResolver(AbstractResolver):
    """Resolves ``*.localhost`` to loopback, as browsers and curl do (RFC 6761)."""

    def __init__(self):
        self._default = aiohttp.DefaultResolver()

    async def resolve(self, host, port=0, family=socket.AF_INET):
        if host == "localhost" or host.endswith(".localhost"):
            return [{"hostname": host, "host": "127.0.0.1", "port": port,
                     "family": socket.AF_INET, "proto": 0, "flags": socket.AI_NUMERICHOST}]
        return await self._default.resolve(host, port, family)

    async def close(self):
        await self._default.close()


class DaemonProxyClient:
    """The calls a backend makes; unchanged from its use against the old service."""

    def __init__(self, session, base_url, token=None):
        self.session = session
        self.base = base_url.rstrip("/") + "/api/daemon-proxy"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def _call(self, method, path, **kwargs):
        async with self.session.request(method, self.base + path, headers=self.headers,
                                        **kwargs) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"{method} {path}: {resp.status} {data.get('detail')}")
            return data

    async def inject(self, container_id):
        return await self._call("POST", f"/container/{container_id}/inject")

    async def create_preview(self, container_id, port, ttl_seconds=None):
        params = {"ttl_seconds": str(ttl_seconds)} if ttl_seconds else None
        return await self._call("POST", f"/container/{container_id}/preview/{port}",
                                params=params)

    async def revoke_preview(self, container_id, port):
        return await self._call("DELETE", f"/container/{container_id}/preview/{port}")

    async def status(self, container_id):
        return await self._call("GET", f"/container/{container_id}/status")

    async def service_status(self):
        return await self._call("GET", "/service/status")

    async def remove(self, container_id):
        return await self._call("POST", f"/container/{container_id}/remove")


async def main(api_url, container, port):
    connector = aiohttp.TCPConnector(resolver=LocalhostResolver())
    async with aiohttp.ClientSession(connector=connector) as session:
        client = DaemonProxyClient(session, api_url, os.environ.get("PREVIEWD_API_TOKEN"))
        service = await client.service_status()
        assert service["status"] == "ok" and service["is_running"], service
        injected = await client.inject(container)
        assert injected["status"] == "injected", injected
        preview = await client.create_preview(container, port, ttl_seconds=600)
        for key in ("url", "token", "port", "expires_at"):
            assert key in preview, (key, preview)
        assert isinstance(preview["expires_at"], (int, float)), preview
        status = await client.status(container)
        assert status["daemon_status"] == "running" and status["service_running"], status
        # What the user's browser does with the URL the backend hands out.
        async with session.get(preview["url"]) as resp:
            page = await resp.text()
            assert resp.status == 200, (resp.status, page)
        async with session.get(preview["path_url"]) as resp:
            assert resp.status == 200, resp.status
        print(f"page: {page.strip()}")
        await client.revoke_preview(container, port)
        async with session.get(preview["url"]) as resp:
            assert resp.status == 404, resp.status
        removed = await client.remove(container)
        print(removed["status"])


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
