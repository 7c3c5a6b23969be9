from django.urls import re_path

from monitoring.consumers import TrainingEventsConsumer

websocket_urlpatterns = [
    re_path(r"\Aws/(?P<client_id>[A-Za-z0-9_.-]{1,64})/?\Z", TrainingEventsConsumer.as_asgi()),
]
