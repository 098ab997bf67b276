# /tapir/run for scripts/demo's second guest (10.77.0.3): a web page the first guest fetches over the
# lower device they share, then it waits for the demo to stop it.
mkdir -p /www
echo "hello from guest B, $(cat /sys/class/net/eth0/address)" >/www/hello
httpd -p 80 -h /www
echo "guest B: serving /hello on 10.77.0.3"
while :; do sleep 3600; done
