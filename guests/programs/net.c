/* net: a user-mode virtio-net driver and a tiny IPv4 host on it. It answers ARP requests for its address and
   ICMP echo requests, and sends UDP datagrams that arrive on its port back to their sender. Ethernet and
   IPv4 only, no fragments, no offloads (only VIRTIO_NET_F_MAC is negotiated). Arguments: ip=A.B.C.D[/prefix]
   (10.0.2.15/24), port=P (7), count=N requests answered, then exit (0: no limit), seconds=S (0: no limit),
   dev=N (0), wait=poll|irq, rxbufs=N (128). */
#include <ulib.h>
#include <virtio.h>

const char program_name[] = "net";

#define VIRTIO_NET_F_MAC 5
#define NET_HEADER 12 /* struct virtio_net_hdr with num_buffers (VERSION_1) */
#define BUFFER 2048
#define MAX_FRAME 1514
#define TX_BUFFERS 64
#define ETH_HEADER 14
#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_ARP 0x0806
#define PROTOCOL_ICMP 1
#define PROTOCOL_UDP 17

static struct virtio_dev dev;
static struct virtq rxq, txq;
static uint8_t *rx_buffers, *tx_buffers;
static unsigned tx_free[TX_BUFFERS], nr_tx_free;
static uint8_t mac[6];
static uint8_t address[4];
static uint16_t port, ip_id;
static uint64_t received, sent, arp_answered, echo_answered, udp_answered, udp_bytes, dropped, ignored, tx_stalls;

static uint16_t get16(const uint8_t *at) { return (uint16_t)(at[0] << 8 | at[1]); }
static void put16(uint8_t *at, uint16_t value)
{
    at[0] = (uint8_t)(value >> 8);
    at[1] = (uint8_t)value;
}

/* The Internet checksum (RFC 1071): one's-complement sum of big-endian 16-bit words. */
static uint32_t sum_bytes(uint32_t sum, const uint8_t *bytes, uint32_t length)
{
    for (; length > 1; bytes += 2, length -= 2)
        sum += get16(bytes);
    if (length)
        sum += (uint32_t)bytes[0] << 8;
    return sum;
}
static uint16_t fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}
static uint32_t pseudo_header(const uint8_t *source, const uint8_t *destination, uint8_t protocol, uint32_t length)
{
    uint32_t sum = sum_bytes(0, source, 4);
    sum = sum_bytes(sum, destination, 4);
    return sum + protocol + length;
}

static void reclaim_tx(void)
{
    uint64_t token;
    while (virtq_get(&txq, &token, 0))
        tx_free[nr_tx_free++] = (unsigned)token;
}

/* A frame buffer to build a reply in (its virtio-net header zeroed), or 0 if the device keeps them all. */
static uint8_t *tx_buffer(unsigned *slot)
{
    reclaim_tx();
    if (!nr_tx_free) {
        virtq_kick(&txq);
        if (virtq_wait(&txq, 1000) != VIRTIO_OK) {
            tx_stalls++;
            return 0;
        }
        reclaim_tx();
    }
    *slot = tx_free[--nr_tx_free];
    uint8_t *buffer = tx_buffers + *slot * BUFFER;
    memset(buffer, 0, NET_HEADER);
    return buffer + NET_HEADER;
}

static void transmit(unsigned slot, uint32_t frame_length)
{
    struct virtq_buf buf = {virtio_phys(&dev, tx_buffers + slot * BUFFER), NET_HEADER + frame_length, false};
    virtq_add(&txq, &buf, 1, slot);
    sent++;
}

static void answer_arp(const uint8_t *frame, uint32_t length)
{
    const uint8_t *arp = frame + ETH_HEADER;
    if (length < ETH_HEADER + 28 || get16(arp) != 1 || get16(arp + 2) != ETHERTYPE_IPV4 || arp[4] != 6 ||
        arp[5] != 4) {
        dropped++;
        return;
    }
    if (get16(arp + 6) != 1 || memcmp(arp + 24, address, 4)) { /* not a request for us */
        ignored++;
        return;
    }
    unsigned slot;
    uint8_t *reply = tx_buffer(&slot);
    if (!reply)
        return;
    memcpy(reply, arp + 8, 6); /* to the sender's hardware address */
    memcpy(reply + 6, mac, 6);
    put16(reply + 12, ETHERTYPE_ARP);
    uint8_t *out = reply + ETH_HEADER;
    put16(out, 1);
    put16(out + 2, ETHERTYPE_IPV4);
    out[4] = 6;
    out[5] = 4;
    put16(out + 6, 2);
    memcpy(out + 8, mac, 6);
    memcpy(out + 14, address, 4);
    memcpy(out + 18, arp + 8, 10); /* target: the sender's hardware and protocol addresses */
    transmit(slot, ETH_HEADER + 28);
    arp_answered++;
}

/* An IPv4 reply to `ip` (its sender) carrying `payload_length` bytes the caller writes after the header. */
static uint8_t *ipv4_reply(const uint8_t *frame, const uint8_t *ip, uint8_t protocol, uint32_t payload_length,
                           unsigned *slot)
{
    uint8_t *reply = tx_buffer(slot);
    if (!reply)
        return 0;
    memcpy(reply, frame + 6, 6);
    memcpy(reply + 6, mac, 6);
    put16(reply + 12, ETHERTYPE_IPV4);
    uint8_t *out = reply + ETH_HEADER;
    out[0] = 0x45;
    out[1] = 0;
    put16(out + 2, (uint16_t)(20 + payload_length));
    put16(out + 4, ip_id++);
    put16(out + 6, 0x4000); /* don't fragment */
    out[8] = 64;
    out[9] = protocol;
    put16(out + 10, 0);
    memcpy(out + 12, address, 4);
    memcpy(out + 16, ip + 12, 4);
    put16(out + 10, fold(sum_bytes(0, out, 20)));
    return out + 20;
}

static void answer_ipv4(const uint8_t *frame, uint32_t length)
{
    const uint8_t *ip = frame + ETH_HEADER;
    uint32_t available = length - ETH_HEADER;
    if (available < 20 || ip[0] >> 4 != 4) {
        dropped++;
        return;
    }
    uint32_t header = (ip[0] & 15u) * 4, total = get16(ip + 2);
    if (header < 20 || total < header || total > available || fold(sum_bytes(0, ip, header))) {
        dropped++;
        return;
    }
    if (memcmp(ip + 16, address, 4) || get16(ip + 6) & 0x3FFF) { /* not ours, or a fragment */
        ignored++;
        return;
    }
    const uint8_t *data = ip + header;
    uint32_t data_length = total - header;
    unsigned slot;
    if (ip[9] == PROTOCOL_ICMP) {
        if (data_length < 8 || fold(sum_bytes(0, data, data_length))) {
            dropped++;
            return;
        }
        if (data[0] != 8 || data[1] != 0 || data_length > MAX_FRAME - ETH_HEADER - 20) { /* echo requests only */
            ignored++;
            return;
        }
        uint8_t *out = ipv4_reply(frame, ip, PROTOCOL_ICMP, data_length, &slot);
        if (!out)
            return;
        memcpy(out, data, data_length);
        out[0] = 0; /* echo reply */
        put16(out + 2, 0);
        put16(out + 2, fold(sum_bytes(0, out, data_length)));
        transmit(slot, ETH_HEADER + 20 + data_length);
        echo_answered++;
    } else if (ip[9] == PROTOCOL_UDP) {
        uint32_t udp_length = data_length >= 8 ? get16(data + 4) : 0;
        if (udp_length < 8 || udp_length > data_length ||
            (get16(data + 6) &&
             fold(sum_bytes(pseudo_header(ip + 12, ip + 16, PROTOCOL_UDP, udp_length), data, udp_length)))) {
            dropped++;
            return;
        }
        if (get16(data + 2) != port || udp_length > MAX_FRAME - ETH_HEADER - 20) {
            ignored++;
            return;
        }
        uint8_t *out = ipv4_reply(frame, ip, PROTOCOL_UDP, udp_length, &slot);
        if (!out)
            return;
        memcpy(out, data + 2, 2); /* ports swapped */
        memcpy(out + 2, data, 2);
        put16(out + 4, (uint16_t)udp_length);
        put16(out + 6, 0);
        memcpy(out + 8, data + 8, udp_length - 8);
        uint16_t checksum = fold(sum_bytes(pseudo_header(address, ip + 12, PROTOCOL_UDP, udp_length), out, udp_length));
        put16(out + 6, checksum ? checksum : 0xFFFF);
        transmit(slot, ETH_HEADER + 20 + udp_length);
        udp_answered++;
        udp_bytes += udp_length - 8;
    } else {
        ignored++;
    }
}

static void handle(const uint8_t *frame, uint32_t length)
{
    received++;
    if (length < ETH_HEADER) {
        dropped++;
        return;
    }
    uint16_t type = get16(frame + 12);
    if (type == ETHERTYPE_ARP)
        answer_arp(frame, length);
    else if (type == ETHERTYPE_IPV4)
        answer_ipv4(frame, length);
    else
        ignored++;
}

static void post_rx(unsigned slot)
{
    struct virtq_buf buf = {virtio_phys(&dev, rx_buffers + slot * BUFFER), BUFFER, true};
    virtq_add(&rxq, &buf, 1, slot);
}

static bool parse_address(const char *text, uint8_t *out, unsigned *prefix)
{
    for (unsigned part = 0; part < 4; part++) {
        unsigned value = 0, digits = 0;
        while (*text >= '0' && *text <= '9' && digits < 4) {
            value = value * 10 + (unsigned)(*text++ - '0');
            digits++;
        }
        if (!digits || value > 255 || (part < 3 && *text++ != '.'))
            return false;
        out[part] = (uint8_t)value;
    }
    *prefix = 32;
    if (*text == '/') {
        text++;
        unsigned value = 0, digits = 0;
        while (*text >= '0' && *text <= '9' && digits < 3) {
            value = value * 10 + (unsigned)(*text++ - '0');
            digits++;
        }
        if (!digits || value > 32)
            return false;
        *prefix = value;
    }
    return *text == '\0';
}

int main(void)
{
    char text[32];
    unsigned prefix;
    arg_str("ip", text, sizeof text, "10.0.2.15/24");
    if (!parse_address(text, address, &prefix)) {
        report(false, "ip=%s is not A.B.C.D or A.B.C.D/prefix", text);
        return (int)failures();
    }
    port = (uint16_t)arg_u64("port", 7);
    uint64_t count = arg_u64("count", 0), seconds = arg_u64("seconds", 0);
    unsigned nth = (unsigned)arg_u64("dev", 0), rx_wanted = (unsigned)arg_u64("rxbufs", 128);
    bool irq = virtio_arg_irq();
    if (!rx_wanted || rx_wanted > 256)
        rx_wanted = 128;
    if (virtio_open(&dev, VIRTIO_ID_NET, nth, 192 * 1024 + (rx_wanted + TX_BUFFERS) * BUFFER, irq) ||
        virtio_start(&dev, VIRTIO_BIT(VIRTIO_NET_F_MAC)) || virtq_setup(&dev, &rxq, 0, rx_wanted) ||
        virtq_setup(&dev, &txq, 1, TX_BUFFERS)) {
        report(false, "no usable virtio network device #%u", nth);
        return (int)failures();
    }
    bool mac_from_device = dev.features & VIRTIO_BIT(VIRTIO_NET_F_MAC);
    if (mac_from_device) {
        virtio_config_read(&dev, 0, mac, 6);
    } else { /* locally administered */
        static const uint8_t generated[6] = {0x02, 0x00, 0x00, 0x00, 0x00, 0x01};
        memcpy(mac, generated, 6);
        mac[5] = (uint8_t)env.pid;
    }
    unsigned rx_count = rxq.size, tx_count = txq.size < TX_BUFFERS ? txq.size : TX_BUFFERS;
    rx_buffers = virtio_alloc(&dev, (uint64_t)rx_count * BUFFER, 64);
    tx_buffers = virtio_alloc(&dev, (uint64_t)tx_count * BUFFER, 64);
    if (!rx_buffers || !tx_buffers) {
        report(false, "DMA area too small");
        return (int)failures();
    }
    for (unsigned slot = 0; slot < rx_count; slot++)
        post_rx(slot);
    for (unsigned slot = 0; slot < tx_count; slot++)
        tx_free[nr_tx_free++] = slot;
    if (!virtio_ready(&dev)) {
        report(false, "the device did not start");
        return (int)failures();
    }
    virtq_kick(&rxq);
    printf("net %u: virtio %u (irq %u): mac %02x:%02x:%02x:%02x:%02x:%02x%s, ip %u.%u.%u.%u/%u, udp port %u, "
           "features %#lx, %u receive buffers, wait %s\n",
           env.pid, dev.index, dev.irq, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5],
           mac_from_device ? "" : " (generated)", address[0], address[1], address[2], address[3], prefix, port,
           dev.features, rx_count, irq ? "irq" : "poll");
    printf("net %u: ready\n", env.pid);

    uint64_t started = rdtsc(), limit = seconds * 1000 * tsc_khz();
    struct virtq *const waited_on[] = {&rxq};
    for (;;) {
        uint64_t answered = arp_answered + echo_answered + udp_answered;
        uint64_t elapsed = rdtsc() - started;
        if ((count && answered >= count) || (seconds && elapsed >= limit))
            break;
        uint64_t slot;
        uint32_t length;
        bool any = false;
        while (virtq_get(&rxq, &slot, &length)) {
            if (length >= NET_HEADER)
                handle(rx_buffers + slot * BUFFER + NET_HEADER, length - NET_HEADER);
            else
                dropped++;
            post_rx((unsigned)slot);
            any = true;
        }
        if (any) {
            virtq_kick(&txq);
            virtq_kick(&rxq);
            reclaim_tx();
            continue;
        }
        uint64_t wait_ms = 1000;
        if (seconds && (limit - elapsed) / tsc_khz() + 1 < wait_ms)
            wait_ms = (limit - elapsed) / tsc_khz() + 1;
        int waited = virtio_wait(&dev, waited_on, 1, wait_ms);
        if (waited == VIRTIO_NEEDS_RESET) {
            report(false, "the device needs a reset");
            break;
        }
    }
    uint64_t elapsed_ms = cycles_to_ns(rdtsc() - started) / 1000000;
    uint64_t answered = arp_answered + echo_answered + udp_answered;
    printf("net %u: handled %lu ARP requests, %lu ICMP echo requests, %lu UDP datagrams (%lu bytes); received %lu "
           "frames, sent %lu, dropped %lu (malformed or bad checksum), ignored %lu\n",
           env.pid, arp_answered, echo_answered, udp_answered, udp_bytes, received, sent, dropped, ignored);
    printf("net %u: %lu notifies, %lu waits, %lu interrupts\n", env.pid, dev.notifies, dev.waits, dev.interrupts);
    if (tx_stalls)
        report(false, "the transmit queue stalled %lu times (replies lost)", tx_stalls);
    if (count && answered < count)
        report(false, "answered %lu of %lu requests in %lu ms", answered, count, elapsed_ms);
    else
        report(true, "answered %lu requests in %lu ms", answered, elapsed_ms);
    return (int)failures();
}
