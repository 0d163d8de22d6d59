/* vsock: a user-mode virtio-vsock driver with one stream connection at a time (virtio 1.2, 5.10). Modes:
     connect port=P [cid=2] [msg=WORD]: connects to the host, sends "WORD\n", reads the reply up to a newline
                                        (or the peer's shutdown), prints it, and closes cleanly
     listen port=P [count=N]:           accepts N (1) connections and echoes what arrives until the peer
                                        shuts down
   Both: dev=N (0), wait=poll|irq, seconds=S (30, the longest wait for anything). Credit follows the spec: our
   buf_alloc and fwd_cnt travel in every header, we never send more than the peer's buf_alloc - (tx_cnt -
   peer fwd_cnt), and a CREDIT_UPDATE goes out when half of our buffer has been consumed unannounced. */
#include <ulib.h>
#include <virtio.h>

const char program_name[] = "vsock";

#define VIRTIO_VSOCK_F_STREAM 0
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define TYPE_STREAM 1
#define SHUTDOWN_RCV 1u
#define SHUTDOWN_SEND 2u
#define EVENT_TRANSPORT_RESET 0
#define HOST_CID 2
#define PAYLOAD 4096
#define PACKET (sizeof(struct vsock_header) + PAYLOAD)
#define STRIDE 4224
#define RX_BUFFERS 64
#define TX_BUFFERS 32
#define EVENT_BUFFERS 8
#define BUF_ALLOC 65536u /* our receive buffer: what the peer may send before we consume it */
#define CLOSE_WAIT_MS 2000

struct vsock_header {
    uint64_t src_cid;
    uint64_t dst_cid;
    uint32_t src_port;
    uint32_t dst_port;
    uint32_t len;
    uint16_t type;
    uint16_t op;
    uint32_t flags;
    uint32_t buf_alloc;
    uint32_t fwd_cnt;
} __attribute__((packed));
_Static_assert(sizeof(struct vsock_header) == 44, "virtio_vsock_hdr is 44 bytes");

enum state { CLOSED, CONNECTING, CONNECTED, CLOSING };

/* The one connection. */
static struct {
    enum state state;
    uint64_t peer_cid;
    uint32_t local_port, peer_port;
    uint32_t peer_buf_alloc, peer_fwd_cnt; /* the peer's receive space, from its headers */
    uint32_t tx_cnt;                       /* payload bytes we sent */
    uint32_t fwd_cnt;                      /* payload bytes we consumed */
    uint32_t fwd_cnt_sent;                 /* the fwd_cnt the peer last heard */
    uint32_t peer_shutdown;                /* SHUTDOWN_* flags the peer sent */
    bool peer_shut_send;                   /* the peer will send no more */
    bool reset;                            /* RST received */
    bool credit_requested;                 /* a CREDIT_REQUEST went out and the peer has not spoken since */
    uint64_t received;                     /* payload bytes */
} conn;

static struct virtio_dev dev;
static struct virtq rxq, txq, eventq;
static uint8_t *rx_buffers, *tx_buffers, *event_buffers;
static unsigned tx_free[TX_BUFFERS], nr_tx_free;
static uint64_t guest_cid, timeout_ms;
static uint64_t resets_sent, transport_resets;
static bool device_failed;

/* Echo (listen mode): bytes received and not yet sent back; they count as consumed once sent. */
static uint8_t pending[BUF_ALLOC];
static uint32_t pending_length;
/* Reply (connect mode). */
static char reply[256];
static uint32_t reply_length;
static bool reply_complete;
static bool echo_mode;

static void reclaim_tx(void)
{
    uint64_t token;
    while (virtq_get(&txq, &token, 0))
        tx_free[nr_tx_free++] = (unsigned)token;
}

static bool send_packet(uint16_t op, uint32_t flags, const void *payload, uint32_t length, uint64_t dst_cid,
                        uint32_t src_port, uint32_t dst_port)
{
    reclaim_tx();
    while (!nr_tx_free) {
        virtq_kick(&txq);
        if (virtq_wait(&txq, timeout_ms) != VIRTIO_OK) {
            device_failed = true;
            return false;
        }
        reclaim_tx();
    }
    unsigned slot = tx_free[--nr_tx_free];
    uint8_t *buffer = tx_buffers + slot * STRIDE;
    struct vsock_header *header = (struct vsock_header *)buffer;
    header->src_cid = guest_cid;
    header->dst_cid = dst_cid;
    header->src_port = src_port;
    header->dst_port = dst_port;
    header->len = length;
    header->type = TYPE_STREAM;
    header->op = op;
    header->flags = flags;
    header->buf_alloc = BUF_ALLOC;
    header->fwd_cnt = conn.fwd_cnt;
    if (length)
        memcpy(buffer + sizeof *header, payload, length);
    struct virtq_buf buf = {virtio_phys(&dev, buffer), (uint32_t)sizeof *header + length, false};
    virtq_add(&txq, &buf, 1, slot);
    virtq_kick(&txq);
    if (dst_cid == conn.peer_cid && dst_port == conn.peer_port && src_port == conn.local_port)
        conn.fwd_cnt_sent = conn.fwd_cnt;
    return true;
}

static bool send_to_peer(uint16_t op, uint32_t flags, const void *payload, uint32_t length)
{
    return send_packet(op, flags, payload, length, conn.peer_cid, conn.local_port, conn.peer_port);
}

static uint32_t peer_credit(void)
{
    uint32_t in_flight = conn.tx_cnt - conn.peer_fwd_cnt;
    return in_flight < conn.peer_buf_alloc ? conn.peer_buf_alloc - in_flight : 0;
}

/* Sends what the peer has room for; returns the bytes sent. */
static uint32_t send_data(const uint8_t *data, uint32_t length)
{
    uint32_t done = 0;
    while (done < length && conn.state == CONNECTED) {
        uint32_t room = peer_credit(), piece = length - done;
        if (!room)
            break;
        if (piece > room)
            piece = room;
        if (piece > PAYLOAD)
            piece = PAYLOAD;
        if (!send_to_peer(OP_RW, 0, data + done, piece))
            break;
        conn.tx_cnt += piece;
        done += piece;
    }
    return done;
}

/* No room at the peer: ask where it stands, once until it says something. */
static void request_credit(void)
{
    if (conn.state == CONNECTED && !conn.credit_requested && send_to_peer(OP_CREDIT_REQUEST, 0, 0, 0))
        conn.credit_requested = true;
}

static void flush_echo(void)
{
    if (!pending_length)
        return;
    uint32_t sent = send_data(pending, pending_length);
    if (!sent) {
        request_credit();
        return;
    }
    memmove(pending, pending + sent, pending_length - sent);
    pending_length -= sent;
    conn.fwd_cnt += sent; /* echoed bytes are consumed: the peer may send that much more */
}

static void consume(const uint8_t *data, uint32_t length)
{
    conn.received += length;
    if (echo_mode) {
        if (length > sizeof pending - pending_length) { /* the peer overran the credit we gave */
            printf("vsock %u: the peer sent beyond our buf_alloc, resetting\n", env.pid);
            send_to_peer(OP_RST, 0, 0, 0);
            conn.state = CLOSED;
            return;
        }
        memcpy(pending + pending_length, data, length);
        pending_length += length;
        return;
    }
    for (uint32_t index = 0; index < length; index++) {
        if (reply_complete)
            break;
        char c = (char)data[index];
        if (c == '\n')
            reply_complete = true;
        else if (reply_length < sizeof reply - 1)
            reply[reply_length++] = c >= 0x20 && c < 0x7F && c != '\'' ? c : '?';
    }
    conn.fwd_cnt += length;
}

static void handle_packet(const struct vsock_header *header, const uint8_t *payload, uint32_t length,
                          uint32_t listen_port)
{
    bool ours = conn.state != CLOSED && header->src_cid == conn.peer_cid && header->src_port == conn.peer_port &&
                header->dst_port == conn.local_port;
    if (header->type != TYPE_STREAM) {
        if (header->op != OP_RST)
            send_packet(OP_RST, 0, 0, 0, header->src_cid, header->dst_port, header->src_port);
        return;
    }
    if (!ours) {
        if (header->op == OP_REQUEST && listen_port && header->dst_port == listen_port && conn.state == CLOSED) {
            memset(&conn, 0, sizeof conn);
            conn.peer_cid = header->src_cid;
            conn.peer_port = header->src_port;
            conn.local_port = listen_port;
            conn.peer_buf_alloc = header->buf_alloc;
            conn.peer_fwd_cnt = header->fwd_cnt;
            conn.state = CONNECTED;
            pending_length = 0;
            send_to_peer(OP_RESPONSE, 0, 0, 0);
            printf("vsock %u: accepted cid %lu port %u\n", env.pid, conn.peer_cid, conn.peer_port);
        } else if (header->op != OP_RST) { /* nobody here: refuse, as the spec asks */
            send_packet(OP_RST, 0, 0, 0, header->src_cid, header->dst_port, header->src_port);
            resets_sent++;
        }
        return;
    }
    conn.peer_buf_alloc = header->buf_alloc;
    conn.peer_fwd_cnt = header->fwd_cnt;
    conn.credit_requested = false;
    switch (header->op) {
    case OP_RESPONSE:
        if (conn.state == CONNECTING)
            conn.state = CONNECTED;
        break;
    case OP_RST:
        conn.reset = true;
        conn.state = CLOSED;
        break;
    case OP_SHUTDOWN:
        conn.peer_shutdown |= header->flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        if (header->flags & SHUTDOWN_SEND)
            conn.peer_shut_send = true;
        break;
    case OP_RW:
        if (conn.state == CONNECTED || conn.state == CLOSING)
            consume(payload, length);
        break;
    case OP_CREDIT_REQUEST:
        send_to_peer(OP_CREDIT_UPDATE, 0, 0, 0);
        break;
    case OP_CREDIT_UPDATE:
    default:
        break;
    }
}

static void post_rx(unsigned slot)
{
    struct virtq_buf buf = {virtio_phys(&dev, rx_buffers + slot * STRIDE), (uint32_t)PACKET, true};
    virtq_add(&rxq, &buf, 1, slot);
}

static void post_event(unsigned slot)
{
    struct virtq_buf buf = {virtio_phys(&dev, event_buffers + slot * 8), 4, true};
    virtq_add(&eventq, &buf, 1, slot);
}

/* Takes in what arrived (packets and events); waits up to wait_ms when nothing did. False when the device
   failed. */
static bool step(uint32_t listen_port, uint64_t wait_ms)
{
    bool any = false;
    uint64_t slot;
    uint32_t length;
    while (virtq_get(&rxq, &slot, &length)) {
        const struct vsock_header *header = (const struct vsock_header *)(rx_buffers + slot * STRIDE);
        if (length >= sizeof *header && header->len <= length - sizeof *header && header->len <= PAYLOAD)
            handle_packet(header, (const uint8_t *)(header + 1), header->len, listen_port);
        post_rx((unsigned)slot);
        any = true;
    }
    while (virtq_get(&eventq, &slot, &length)) {
        uint32_t id = *(const uint32_t *)(event_buffers + slot * 8);
        if (id == EVENT_TRANSPORT_RESET) {
            /* Every connection is gone and the CID may have changed. */
            transport_resets++;
            virtio_config_read(&dev, 0, &guest_cid, 8);
            printf("vsock %u: transport reset, guest cid now %lu\n", env.pid, guest_cid);
            conn.state = CLOSED;
            conn.reset = true;
        }
        post_event((unsigned)slot);
        any = true;
    }
    if (any) {
        virtq_kick(&rxq);
        virtq_kick(&eventq);
    }
    if (echo_mode)
        flush_echo();
    /* Tell the peer about consumed space once half of our buffer has gone unannounced. */
    if (conn.state == CONNECTED && conn.fwd_cnt - conn.fwd_cnt_sent >= BUF_ALLOC / 2)
        send_to_peer(OP_CREDIT_UPDATE, 0, 0, 0);
    reclaim_tx();
    if (any || !wait_ms)
        return true;
    struct virtq *const queues[] = {&rxq, &eventq};
    int waited = virtio_wait(&dev, queues, 2, wait_ms);
    if (waited == VIRTIO_NEEDS_RESET) {
        device_failed = true;
        return false;
    }
    return true;
}

/* Runs step() until done() or the timeout; false on timeout or device failure. */
static bool run_until(bool (*done)(void), uint32_t listen_port, uint64_t limit_ms)
{
    uint64_t started = rdtsc(), limit = limit_ms * tsc_khz();
    while (!done()) {
        uint64_t elapsed = rdtsc() - started;
        if (elapsed >= limit || device_failed)
            return false;
        uint64_t left_ms = (limit - elapsed) / tsc_khz() + 1;
        if (!step(listen_port, left_ms < 100 ? left_ms : 100))
            return false;
    }
    return true;
}

static bool not_connecting(void) { return conn.state != CONNECTING; }
static bool reply_done(void) { return reply_complete || conn.peer_shut_send || conn.state == CLOSED; }
static bool closed(void) { return conn.state == CLOSED; }
static bool echo_done(void) { return conn.state == CLOSED || (conn.peer_shut_send && !pending_length); }
static bool accepted(void) { return conn.state == CONNECTED; }

/* Clean close (5.10.6.6): the side that receives a full SHUTDOWN answers with RST; otherwise we send SHUTDOWN
   both ways and wait for the peer's RST (sending our own after a while). */
static const char *close_connection(void)
{
    if (conn.state == CLOSED)
        return conn.reset ? "reset by the peer" : "closed";
    if (conn.peer_shutdown == (SHUTDOWN_RCV | SHUTDOWN_SEND)) {
        send_to_peer(OP_RST, 0, 0, 0);
        conn.state = CLOSED;
        return "closed: the peer shut down, RST sent";
    }
    conn.state = CLOSING;
    send_to_peer(OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0, 0);
    if (run_until(closed, 0, CLOSE_WAIT_MS))
        return "closed: SHUTDOWN sent, RST received";
    send_to_peer(OP_RST, 0, 0, 0);
    conn.state = CLOSED;
    return "closed: SHUTDOWN sent, no RST within 2000 ms, so RST sent";
}

static void do_connect(uint32_t port, uint64_t cid)
{
    char message[64], line[72];
    arg_str("msg", message, sizeof message, "hello-from-pyrovisor");
    uint32_t length = (uint32_t)snprintf(line, sizeof line, "%s\n", message);
    memset(&conn, 0, sizeof conn);
    conn.peer_cid = cid;
    conn.peer_port = port;
    conn.local_port = 1024 + (uint32_t)(rdtsc() % 30000) + env.pid;
    conn.state = CONNECTING;
    printf("vsock %u: connecting to cid %lu port %u from port %u\n", env.pid, cid, port, conn.local_port);
    send_to_peer(OP_REQUEST, 0, 0, 0);
    if (!run_until(not_connecting, 0, timeout_ms) || conn.state != CONNECTED) {
        report(false, "connect to cid %lu port %u: %s", cid, port,
               conn.reset ? "refused (RST)" : device_failed ? "the device failed" : "no answer");
        return;
    }
    printf("vsock %u: connected, peer buf_alloc %u\n", env.pid, conn.peer_buf_alloc);
    uint32_t sent = 0;
    uint64_t started = rdtsc(), limit = timeout_ms * tsc_khz();
    while (sent < length && conn.state == CONNECTED && rdtsc() - started < limit) {
        sent += send_data((const uint8_t *)line + sent, length - sent);
        if (sent < length) {
            request_credit();
            run_until(closed, 0, 10); /* let a CREDIT_UPDATE arrive */
        }
    }
    printf("vsock %u: sent %u bytes: '%s'\n", env.pid, sent, message);
    bool answered = run_until(reply_done, 0, timeout_ms) && reply_length;
    printf("vsock %u: reply '%s'%s\n", env.pid, reply, reply_complete ? "" : " (no newline)");
    const char *how = close_connection();
    printf("vsock %u: %s\n", env.pid, how);
    report(sent == length && answered, "connect cid %lu port %u: sent %u bytes, received %lu bytes", cid, port, sent,
           conn.received);
}

static void do_listen(uint32_t port, uint64_t count)
{
    echo_mode = true;
    printf("vsock %u: listening on cid %lu port %u\n", env.pid, guest_cid, port);
    uint64_t connections = 0, echoed = 0;
    while (connections < count) {
        memset(&conn, 0, sizeof conn);
        if (!run_until(accepted, port, timeout_ms)) {
            report(false, "listen port %u: no connection within %lu ms (%lu accepted)", port, timeout_ms, connections);
            return;
        }
        connections++;
        uint64_t peer_cid = conn.peer_cid;
        uint32_t peer_port = conn.peer_port;
        bool finished = run_until(echo_done, port, timeout_ms);
        uint64_t bytes = conn.received - pending_length;
        echoed += bytes;
        const char *how = finished ? close_connection() : "timed out";
        printf("vsock %u: connection from cid %lu port %u: echoed %lu bytes, %s\n", env.pid, peer_cid, peer_port, bytes,
               how);
        if (!finished) {
            report(false, "listen port %u: the connection did not finish within %lu ms", port, timeout_ms);
            return;
        }
    }
    report(true, "listen port %u: %lu connections, %lu bytes echoed", port, connections, echoed);
}

/* The mode: the first argument word without '=' (`vsock connect port=P`), or mode=. */
static void get_mode(char *mode, size_t size)
{
    if (arg_str("mode", mode, size, ""))
        return;
    const char *text = env.args, *end = env.args + env.args_length;
    while (text < end) {
        while (text < end && (*text == ' ' || *text == '\t'))
            text++;
        const char *word = text;
        bool has_equals = false;
        while (text < end && *text != ' ' && *text != '\t')
            has_equals |= *text++ == '=';
        size_t length = (size_t)(text - word);
        if (length && !has_equals && length < size) {
            memcpy(mode, word, length);
            mode[length] = '\0';
            return;
        }
    }
}

int main(void)
{
    char mode[16];
    get_mode(mode, sizeof mode);
    uint32_t port = (uint32_t)arg_u64("port", 1234);
    uint64_t cid = arg_u64("cid", HOST_CID), count = arg_u64("count", 1);
    timeout_ms = arg_u64("seconds", 30) * 1000;
    unsigned nth = (unsigned)arg_u64("dev", 0);
    bool irq = virtio_arg_irq();
    bool connecting = !strcmp(mode, "connect");
    if (!connecting && strcmp(mode, "listen")) {
        report(false, "say `vsock connect port=P` or `vsock listen port=P` (mode '%s')", mode);
        return (int)failures();
    }
    if (virtio_open(&dev, VIRTIO_ID_VSOCK, nth, 128 * 1024 + (RX_BUFFERS + TX_BUFFERS) * STRIDE, irq) ||
        virtio_start(&dev, VIRTIO_BIT(VIRTIO_VSOCK_F_STREAM)) || virtq_setup(&dev, &rxq, 0, RX_BUFFERS) ||
        virtq_setup(&dev, &txq, 1, TX_BUFFERS) || virtq_setup(&dev, &eventq, 2, EVENT_BUFFERS)) {
        report(false, "no usable virtio vsock device #%u", nth);
        return (int)failures();
    }
    unsigned rx_count = rxq.size, tx_count = txq.size, event_count = eventq.size;
    rx_buffers = virtio_alloc(&dev, (uint64_t)rx_count * STRIDE, 64);
    tx_buffers = virtio_alloc(&dev, (uint64_t)tx_count * STRIDE, 64);
    event_buffers = virtio_alloc(&dev, (uint64_t)event_count * 8, 8);
    if (!rx_buffers || !tx_buffers || !event_buffers) {
        report(false, "DMA area too small");
        return (int)failures();
    }
    for (unsigned slot = 0; slot < rx_count; slot++)
        post_rx(slot);
    for (unsigned slot = 0; slot < event_count; slot++)
        post_event(slot);
    for (unsigned slot = 0; slot < tx_count; slot++)
        tx_free[nr_tx_free++] = slot;
    if (!virtio_ready(&dev)) {
        report(false, "the device did not start");
        return (int)failures();
    }
    virtq_kick(&rxq);
    virtq_kick(&eventq);
    virtio_config_read(&dev, 0, &guest_cid, 8);
    printf("vsock %u: virtio %u (irq %u): guest cid %lu, features %#lx, wait %s\n", env.pid, dev.index, dev.irq,
           guest_cid, dev.features, irq ? "irq" : "poll");
    if (connecting)
        do_connect(port, cid);
    else
        do_listen(port, count);
    if (device_failed)
        report(false, "the device stopped answering or needs a reset");
    printf("vsock %u: %lu notifies, %lu waits, %lu interrupts, %lu resets sent, %lu transport resets\n", env.pid,
           dev.notifies, dev.waits, dev.interrupts, resets_sent, transport_resets);
    return (int)failures();
}
