"""``/docs`` served from this machine: FastAPI's Swagger UI page loads its script and style from a
CDN, which an air-gapped edge server cannot reach. The assets come from the ``swagger-ui-bundle-v2``
package of the serve extra (Swagger UI 5, which renders the OpenAPI 3.1 document FastAPI makes)."""

from __future__ import annotations

from typing import Any

ASSETS = "/docs/assets"


def install_docs(app: Any, dependencies: list[Any]) -> None:
    """Add ``GET /docs`` (behind ``dependencies``) and its static assets under :data:`ASSETS`."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False, dependencies=dependencies)
    async def docs() -> Any:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )
