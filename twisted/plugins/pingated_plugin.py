"""Makes `twistd pingated` find the gate; all logic lives in pingated.tap."""

from twisted.application.service import ServiceMaker

pingated = ServiceMaker("pingated", "pingated.tap", "PIN gate and reverse proxy", "pingated")
