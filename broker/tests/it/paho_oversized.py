"""Publishes an 8 KiB QoS 1 message (over the test broker's 4 KiB limit), then a small
reading, with paho-mqtt as old agents do; exits 0 if both were acknowledged on one connection.

usage: paho_oversized.py HOST PORT 3.1.1|5 CLIENT_ID
"""
import sys

import paho.mqtt.client as mqtt

host, port, version, client_id = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 2
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, client_id=client_id, protocol=protocol)
else:  # paho-mqtt 1.x, as on old agents and in Debian 12
    client = mqtt.Client(client_id=client_id, protocol=protocol)
disconnects = []
client.on_disconnect = lambda *args: disconnects.append(args)
client.connect(host, port, keepalive=30)
client.loop_start()
topic = "co2/" + client_id
big = client.publish(topic, b"7" * 8192, qos=1)
big.wait_for_publish(timeout=10)
small = client.publish(topic, '{"value":598}', qos=1)
small.wait_for_publish(timeout=10)
ok = big.is_published() and small.is_published() and not disconnects
print(f"oversized acked: {big.is_published()}, small acked: {small.is_published()}, "
      f"disconnects: {disconnects}")
client.disconnect()
client.loop_stop()
sys.exit(0 if ok else 1)
