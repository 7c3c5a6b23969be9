"""Operator token endpoints (django-rest-knox views) and the OpenAPI description of the operator scheme."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import extend_schema, inline_serializer
from knox.views import LoginView, LogoutAllView, LogoutView
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response

from fedsite.operator_auth import OperatorTokenAuthentication


class OperatorTokenScheme(OpenApiAuthenticationExtension):
    target_class = "fedsite.operator_auth.OperatorTokenAuthentication"
    name = "operatorToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "Operator token: 'Token fso_...' (manage.py create_operator_token, or "
            "POST /api/v1/auth/login with a staff session). Not an agent's Bearer token.",
        }


TOKEN_RESPONSE = inline_serializer(
    "OperatorToken", {"token": serializers.CharField(), "expiry": serializers.DateTimeField(allow_null=True)}
)


class OperatorLoginView(LoginView):
    """``POST /api/v1/auth/login``: a staff session (browser login) gets a new operator token, shown once."""

    authentication_classes = [SessionAuthentication]
    permission_classes = [IsAdminUser]

    @extend_schema(tags=["operator auth"], request=None, responses={200: TOKEN_RESPONSE})
    def post(self, request: Request, format: Any = None) -> Response:
        return super().post(request, format=format)


class OperatorLogoutView(LogoutView):
    """``POST /api/v1/auth/logout``: revoke the operator token of this request."""

    authentication_classes = [OperatorTokenAuthentication]

    @extend_schema(tags=["operator auth"], request=None, responses={204: None})
    def post(self, request: Request, format: Any = None) -> Response:
        return super().post(request, format=format)


class OperatorLogoutAllView(LogoutAllView):
    """``POST /api/v1/auth/logoutall``: revoke every operator token of this user."""

    authentication_classes = [OperatorTokenAuthentication]

    @extend_schema(tags=["operator auth"], request=None, responses={204: None})
    def post(self, request: Request, format: Any = None) -> Response:
        return super().post(request, format=format)
