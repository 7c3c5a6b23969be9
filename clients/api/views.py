"""Agent protocol v1: enrolment and heartbeat. Operator API: the agent registry."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import OpenApiExample, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clients.models import AGENT_ID_PATTERN, Agent
from clients.selectors import agent_is_online
from clients.services import (
    agent_create,
    agent_enroll,
    agent_register_identity_key,
    agent_rotate_token,
    agent_set_status,
    agent_touch,
)
from fedsite.agent_auth import AgentTokenAuthentication, IsAgent
from fedsite.errors import ValidationFailed
from fedsite.parsers import StrictJSONParser
from fedsite.throttling import client_ip

ENROLL_REQUEST = inline_serializer(
    "EnrollRequest",
    {
        "enrollment_key": serializers.CharField(),
        "agent_id": serializers.RegexField(AGENT_ID_PATTERN, trim_whitespace=False),
        "capabilities": serializers.DictField(required=False),
    },
)
ENROLL_RESPONSE = inline_serializer(
    "EnrollResponse",
    {
        "agent_id": serializers.CharField(),
        "token": serializers.CharField(),
        "heartbeat_interval": serializers.IntegerField(),
    },
)
HEARTBEAT_REQUEST = inline_serializer(
    "HeartbeatRequest",
    {
        "state": serializers.ChoiceField(["idle", "training"], required=False),
        "capabilities": serializers.DictField(required=False),
    },
)
HEARTBEAT_RESPONSE = inline_serializer(
    "HeartbeatResponse",
    {
        "agent_id": serializers.CharField(),
        "server_time": serializers.DateTimeField(),
        "heartbeat_interval": serializers.IntegerField(),
    },
)


def _json_body(request: Request) -> dict[str, Any]:
    data = request.data
    if not isinstance(data, dict):
        raise ValidationFailed("The request body must be a JSON object.")
    return data


class EnrollView(APIView):
    """Self-enrolment with an operator-issued enrolment key."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    parser_classes = [StrictJSONParser]

    @extend_schema(
        tags=["agent protocol"],
        request=ENROLL_REQUEST,
        responses={201: ENROLL_RESPONSE},
        examples=[
            OpenApiExample(
                "enrol", value={"enrollment_key": "fse_...", "agent_id": "hospital-7"}, request_only=True
            )
        ],
    )
    def post(self, request: Request) -> Response:
        body = _json_body(request)
        agent, token = agent_enroll(
            enrollment_key=body.get("enrollment_key"),
            agent_id=body.get("agent_id"),
            capabilities=body.get("capabilities"),
            client_ip=client_ip(request),
        )
        return Response(
            {
                "agent_id": agent.agent_id,
                "token": token,
                "heartbeat_interval": settings.FEDSITE_HEARTBEAT_INTERVAL,
            },
            status=status.HTTP_201_CREATED,
        )


class HeartbeatView(APIView):
    """An agent says it is alive (polling counts too)."""

    authentication_classes = [AgentTokenAuthentication]
    permission_classes = [IsAgent]
    parser_classes = [StrictJSONParser]

    @extend_schema(tags=["agent protocol"], request=HEARTBEAT_REQUEST, responses={200: HEARTBEAT_RESPONSE})
    def post(self, request: Request) -> Response:
        body = _json_body(request) if request.data else {}
        agent = agent_touch(
            agent=request.auth, state=body.get("state"), capabilities=body.get("capabilities")
        )
        return Response(
            {
                "agent_id": agent.agent_id,
                "server_time": timezone.now().isoformat(),
                "heartbeat_interval": settings.FEDSITE_HEARTBEAT_INTERVAL,
            }
        )


IDENTITY_KEY_REQUEST = inline_serializer(
    "IdentityKeyRequest",
    {
        "public_key": serializers.CharField(help_text="base64 of the 32-byte Ed25519 public key"),
        "proof": serializers.CharField(
            help_text="base64 Ed25519 signature of 'fedsite/identity-key/v1/<agent_id>/' + the key bytes"
        ),
    },
)
IDENTITY_KEY_RESPONSE = inline_serializer(
    "IdentityKeyResponse",
    {"agent_id": serializers.CharField(), "public_key": serializers.CharField()},
)


class IdentityKeyView(APIView):
    """``POST /api/v1/agent/identity-key``: register the agent's Ed25519 identity key, once (secure
    aggregation signs its round keys with it). 201 when set, 200 for the same key again, 409 for another."""

    authentication_classes = [AgentTokenAuthentication]
    permission_classes = [IsAgent]
    parser_classes = [StrictJSONParser]

    @extend_schema(
        tags=["agent protocol"],
        request=IDENTITY_KEY_REQUEST,
        responses={201: IDENTITY_KEY_RESPONSE, 200: IDENTITY_KEY_RESPONSE},
    )
    def post(self, request: Request) -> Response:
        body = _json_body(request)
        agent, created = agent_register_identity_key(
            agent=request.auth, public_key=body.get("public_key"), proof=body.get("proof")
        )
        return Response(
            {"agent_id": agent.agent_id, "public_key": agent.identity_public_key},
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


# --- operator resource ------------------------------------------------------------------------------
class AgentSerializer(serializers.ModelSerializer):
    reliability = serializers.FloatField(read_only=True)
    online = serializers.SerializerMethodField()

    class Meta:
        model = Agent
        fields = [
            "id",
            "agent_id",
            "status",
            "state",
            "capabilities",
            "enrolled_via",
            "last_seen_at",
            "online",
            "tasks_completed",
            "tasks_failed",
            "tasks_expired",
            "reliability",
            "token_prefix",
            "created_at",
        ]
        read_only_fields = fields

    def get_online(self, agent: Agent) -> bool:
        return agent_is_online(agent)


class AgentCreateSerializer(serializers.Serializer):
    agent_id = serializers.RegexField(AGENT_ID_PATTERN, trim_whitespace=False)
    capabilities = serializers.DictField(required=False)


class AgentViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Registered agents. Creating one returns its token once."""

    queryset = Agent.objects.all()
    serializer_class = AgentSerializer
    lookup_field = "agent_id"
    lookup_value_regex = r"[A-Za-z0-9_.-]{1,64}"

    @extend_schema(request=AgentCreateSerializer, responses={201: ENROLL_RESPONSE})
    def create(self, request: Request) -> Response:
        serializer = AgentCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        agent, token = agent_create(actor=request.user, **serializer.validated_data)
        return Response(
            {
                "agent_id": agent.agent_id,
                "token": token,
                "heartbeat_interval": settings.FEDSITE_HEARTBEAT_INTERVAL,
            },
            status=status.HTTP_201_CREATED,
        )

    @extend_schema(request=None, responses={200: ENROLL_RESPONSE})
    @action(detail=True, methods=["post"])
    def rotate_token(self, request: Request, agent_id: str | None = None) -> Response:
        agent = self.get_object()
        token = agent_rotate_token(agent=agent, actor=request.user)
        return Response(
            {
                "agent_id": agent.agent_id,
                "token": token,
                "heartbeat_interval": settings.FEDSITE_HEARTBEAT_INTERVAL,
            }
        )

    @extend_schema(request=None, responses={200: AgentSerializer})
    @action(detail=True, methods=["post"])
    def disable(self, request: Request, agent_id: str | None = None) -> Response:
        agent = agent_set_status(agent=self.get_object(), status=Agent.Status.DISABLED, actor=request.user)
        return Response(AgentSerializer(agent).data)

    @extend_schema(request=None, responses={200: AgentSerializer})
    @action(detail=True, methods=["post"])
    def quarantine(self, request: Request, agent_id: str | None = None) -> Response:
        agent = agent_set_status(agent=self.get_object(), status=Agent.Status.QUARANTINED, actor=request.user)
        return Response(AgentSerializer(agent).data)

    @extend_schema(request=None, responses={200: AgentSerializer})
    @action(detail=True, methods=["post"])
    def activate(self, request: Request, agent_id: str | None = None) -> Response:
        agent = agent_set_status(agent=self.get_object(), status=Agent.Status.ACTIVE, actor=request.user)
        return Response(AgentSerializer(agent).data)
