from twisted.application.service import ServiceMaker

regproxy = ServiceMaker("regproxy", "regproxy.tap", "Docker/OCI registry proxy.", "regproxy")
